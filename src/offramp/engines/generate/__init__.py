"""Token-level early-exit generation: the engine (``engine``), its per-row cache (``cache``),
decoding options (``sampling``) and lossless self-speculation from an exit (``speculative``)."""

from offramp.engines.generate.engine import SIGNALS, decoded_exit_layers, generate
from offramp.engines.generate.sampling import SamplingOptions
from offramp.engines.generate.speculative import speculative_generate

__all__ = ["SIGNALS", "SamplingOptions", "decoded_exit_layers", "generate", "speculative_generate"]
