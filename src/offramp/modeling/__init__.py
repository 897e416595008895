"""offramp's exit models: one base, an encoder classifier and a decoder's token exits, one loader.

- ``base``: ``ExitModelBase`` (exit layers, adapter, atomic save, load with kind and version checks),
  ``load`` (any checkpoint by its kind), ``load_hf_model`` (backbones, no remote code),
  ``resolve_dtype`` (``--dtype``, ``auto`` included);
- ``encoder``: ``EarlyExitModel`` (kind ``classifier``);
- ``decoder``: ``DecoderExitModel`` (kind ``token_exits``);
- ``outputs``: every ``ModelOutput``-style result.
"""

from offramp.modeling.base import (HEADS_NAME, ExitModelBase, load, load_hf_model, native_bf16, resolve_dtype,
                                   shape_mismatches)
from offramp.modeling.decoder import DecoderExitModel, default_exit_layers
from offramp.modeling.encoder import EarlyExitModel
from offramp.modeling.outputs import DecoderExitOutput, EarlyExitOutput, GenerateOutput, GenerateReport, Prediction

__all__ = ["HEADS_NAME", "DecoderExitModel", "DecoderExitOutput", "EarlyExitModel", "EarlyExitOutput",
           "ExitModelBase", "GenerateOutput", "GenerateReport", "Prediction", "default_exit_layers", "load",
           "load_hf_model", "native_bf16", "resolve_dtype", "shape_mismatches"]
