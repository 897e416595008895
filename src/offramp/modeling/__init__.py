"""offramp's exit models: one base, an encoder classifier and a decoder's token exits, one loader.

- ``base``: ``ExitModelBase`` (exit layers, adapter, atomic save, load with kind and version checks),
  ``load_hf_model`` (backbones, no remote code), ``resolve_dtype`` (``--dtype``, ``auto`` included);
- ``encoder``: ``EarlyExitModel`` (kind ``classifier``);
- ``decoder``: ``DecoderExitModel`` (kind ``token_exits``);
- ``checkpoints``: ``load`` (any checkpoint by its kind), ``checkpoint_kind``;
- ``causal_lm``: ``load_causal_lm`` (the one causal-LM loader), ``load_exits_and_lm``.

Every ``ModelOutput``-style result lives in ``offramp.outputs``.
"""

from offramp.modeling.base import HEADS_NAME, ExitModelBase, load_hf_model, native_bf16, resolve_dtype, shape_mismatches
from offramp.modeling.causal_lm import load_causal_lm, load_exits_and_lm
from offramp.modeling.checkpoints import checkpoint_kind, load
from offramp.modeling.decoder import DecoderExitModel, default_exit_layers
from offramp.modeling.encoder import EarlyExitModel
from offramp.outputs import DecoderExitOutput, EarlyExitOutput, GenerateOutput, GenerateReport, Prediction

__all__ = ["HEADS_NAME", "DecoderExitModel", "DecoderExitOutput", "EarlyExitModel", "EarlyExitOutput",
           "ExitModelBase", "GenerateOutput", "GenerateReport", "Prediction", "checkpoint_kind",
           "default_exit_layers", "load", "load_causal_lm", "load_exits_and_lm", "load_hf_model", "native_bf16",
           "resolve_dtype", "shape_mismatches"]
