"""Decoder-only backbones (transformer and Mamba) run layer by layer for token-level exits.

Only adapters touch Hugging Face internals. An adapter knows how to embed tokens, run ONE layer
(the HF layer module itself, so forward hooks on it see every call) on a subset of the batch rows,
project a hidden state to keys/values for a layer (CALM's "propagate" cache fill), and apply the
final norm and the LM head. The decoding engine (``offramp.engines.generate``) owns the loop, the
per-row exits and the cache of skipped layers.

Cache protocol: layer modules receive a *view* that implements the methods HF layers call on a
``transformers.Cache`` (``update`` for attention; ``get_conv_state`` / ``update_conv_state`` /
``get_recurrent_state`` / ``update_recurrent_state`` for Mamba). HF's own caches grow or update all
rows of the batch together; per-row exits need per-row, per-position writes, so the engine keeps
the storage (``offramp.engines.generate.cache``) and hands the layer a view on the rows it runs.

Exit layers are counted as "layers run": exit ``k`` reads the hidden state after layers
``0 .. k-1``; ``k = num_layers`` is the full model.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class DecoderAdapter:
    """Layer-by-layer access to a HF causal LM.

    Attributes:
        role: "decoder" (token exits, ``offramp.engines.generate``).
        kind: "attention" (KV cache) or "ssm" (conv + recurrent state).
        model_types: the HF ``model_type`` values this adapter serves (``offramp.backbones.ADAPTERS``).
        gated_mlp: whether the MLP is gated (three projections), for FLOPs counting.
    """

    role: ClassVar[str] = "decoder"
    kind: ClassVar[str] = "attention"
    model_types: ClassVar[tuple[str, ...]] = ()
    gated_mlp: ClassVar[bool] = False  # a SwiGLU/GeGLU MLP (three projections): what FLOPs counting needs

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # ---- structure -------------------------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head().weight.shape[0])

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def layer_device(self, index: int) -> torch.device:
        """The device of layer ``index`` (a model spread by ``device_map`` has several)."""
        return next(self.layers()[index].parameters()).device

    @property
    def head_device(self) -> torch.device:
        return self.lm_head().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head().weight.dtype

    def hidden_after(self, hidden_states: tuple[Tensor, ...], k: int) -> Tensor:
        """The hidden state after ``k`` layers from HF's ``output_hidden_states`` tuple."""
        return hidden_states[k]  # (embeddings, layer 1, ..., layer L)

    def max_positions(self) -> int | None:
        """The longest sequence the model accepts (None: unbounded)."""
        return getattr(self.config, "max_position_embeddings", None)

    # ---- compute ---------------------------------------------------------------------------
    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:  # (b, t) -> (b, t, d)
        raise NotImplementedError

    def logits(self, hidden: Tensor) -> Tensor:  # (b, t, d) -> (b, t, V)
        """Final norm then LM head (the full-vocabulary projection), in the head's dtype (a Mamba
        model in bfloat16 keeps its residual stream in float32, as HF's own forward does)."""
        normed = self.final_norm()(hidden.to(self.head_device))
        return self.softcap(self.lm_head()(normed.to(self.dtype)))

    def logits_subset(self, hidden: Tensor, token_ids: Tensor) -> Tensor:  # (n, d), (k,) -> (n, k)
        """Logits of the tokens ``token_ids`` only (training on a teacher's top-k support)."""
        head = self.lm_head()
        bias = None if getattr(head, "bias", None) is None else head.bias[token_ids]
        x = self.final_norm()(hidden.to(self.head_device)).to(head.weight.dtype)
        return self.softcap(nn.functional.linear(x, head.weight[token_ids], bias))

    def softcap(self, logits: Tensor) -> Tensor:
        """Final-logit soft-capping of the model, if it has one."""
        return logits

    def rotary(self, hidden: Tensor, position_ids: Tensor) -> Any:
        """Position embeddings shared by all layers for ``position_ids`` (b, t); None if unused."""
        return None

    def run_layer(self, index: int, hidden: Tensor, *, cache: Any, mask: Tensor | None = None,
                  position_ids: Tensor | None = None, rotary: Any = None) -> Tensor:
        """Run layer ``index`` (the HF module) on ``hidden`` (b, t, d); returns (b, t, d)."""
        raise NotImplementedError

    # ---- attention-only --------------------------------------------------------------------
    def kv_shape(self) -> tuple[int, int]:
        """(number of key/value heads, head dim) of every attention layer."""
        cfg = self.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return int(heads), int(head_dim)

    def sliding_window(self, index: int) -> int | None:
        """The sliding-window size of attention layer ``index``, None for full attention."""
        return None

    def project_kv(self, index: int, hidden: Tensor, rotary: Any) -> tuple[Tensor, Tensor]:
        """Keys and values (b, heads, t, head_dim) that layer ``index`` makes from ``hidden``."""
        raise NotImplementedError

    def mask_dtype(self) -> str:
        """"bool" (True = attend) for SDPA, "float" (additive) for eager attention."""
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        return "float" if impl == "eager" else "bool"


def text_config(config: Any) -> Any:
    """The text config of a (possibly multimodal) HF config."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config
