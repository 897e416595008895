"""offramp: early exits for Hugging Face transformer and Mamba models that really skip the compute.

The names below are imported on first use (PEP 562), so ``import offramp`` (and ``offramp --help``)
does not load torch and transformers until a model, a config or a policy is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

from offramp.version import __version__

_EXPORTS = {"OfframpConfig": "offramp.config", "DecoderExitModel": "offramp.modeling",
            "EarlyExitModel": "offramp.modeling", "EarlyExitOutput": "offramp.modeling",
            "Prediction": "offramp.modeling", "load": "offramp.modeling", "POLICIES": "offramp.policies",
            "ExitPolicy": "offramp.policies", "make_policy": "offramp.policies"}

__all__ = ["DecoderExitModel", "EarlyExitModel", "EarlyExitOutput", "ExitPolicy", "OfframpConfig", "POLICIES",
           "Prediction", "load", "make_policy", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'offramp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
