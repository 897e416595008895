"""Token-level early-exit generation: the engine (``engine``), its per-row cache (``cache``),
decoding options (``sampling``), streamed text (``text``), lossless self-speculation from an
exit (``speculative``), the cost model that picks its exit and draft length (``plan``) and
continuous batching, where rows join and leave a running batch between steps (``continuous``)."""

from offramp.engines.generate.continuous import ContinuousBatch, ContinuousSpeculation, RowToken
from offramp.engines.generate.engine import SIGNALS, TokenStep, decoded_exit_layers, generate, stream_generate
from offramp.engines.generate.plan import RoundCosts, SpeculationPlan, plan_speculation
from offramp.engines.generate.sampling import SamplingOptions
from offramp.engines.generate.speculative import frequent_tokens, speculative_generate
from offramp.engines.generate.text import TextPieces

__all__ = ["SIGNALS", "ContinuousBatch", "ContinuousSpeculation", "RoundCosts", "RowToken", "SamplingOptions", "SpeculationPlan", "decoded_exit_layers", "frequent_tokens",
           "generate",
           "plan_speculation", "speculative_generate", "stream_generate", "TextPieces", "TokenStep"]
