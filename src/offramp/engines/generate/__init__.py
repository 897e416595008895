"""Token-level early-exit generation: the engine (``engine``), its per-row cache (``cache``) and
decoding options (``sampling``)."""

from offramp.engines.generate.engine import SIGNALS, decoded_exit_layers, generate
from offramp.engines.generate.sampling import SamplingOptions

__all__ = ["SIGNALS", "SamplingOptions", "decoded_exit_layers", "generate"]
