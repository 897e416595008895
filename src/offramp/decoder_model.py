"""A decoder LM with token exits: the (frozen) HF backbone + exit heads + confidence classifiers.

``DecoderExitModel`` holds the backbone by reference. ``save_pretrained`` writes
``offramp_config.json`` (with ``base_model_name_or_path``) and ``offramp_exit_heads.safetensors``
(the exit heads and confidence classifiers only); ``from_pretrained`` loads the backbone by that
reference (or takes one you pass) and restores the heads.

Exit layers count layers run: exit ``k`` reads the hidden state after ``k`` layers, 1 <= k < L.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from offramp.backbones import DecoderAdapter, adapter_for
from offramp.heads.lm import ConfidenceHead, LMExitHead, build_lm_head

CONFIG_NAME = "offramp_config.json"
WEIGHTS_NAME = "offramp_exit_heads.safetensors"
FORMAT = "decoder-exits/1"


def default_exit_layers(num_layers: int, count: int = 5) -> list[int]:
    """``count`` evenly spaced exits in the second half of ``num_layers`` layers (DYNAMAX)."""
    first = max(1, num_layers // 2)
    span = list(range(first, num_layers))
    if len(span) <= count:
        return span
    step = len(span) / count
    return sorted({span[int(i * step)] for i in range(count)})


@dataclass
class DecoderExitConfig:
    """What a ``DecoderExitModel`` adds to its backbone.

    Args:
        exit_layers: layers run before each exit, increasing, each in [1, num_layers - 1].
        head: exit head type ("tied", "ffn", "block", "mamba") and its keyword arguments.
        confidence_hidden: width of the confidence classifier.
        top_k: an exit counts as correct when its top token is in the final layer's top-k.
        threshold: default exit confidence threshold of the engine.
        cache_strategy: default cache strategy (copy_kv | propagate | catch_up | freeze | update).
        base_model_name_or_path: where ``from_pretrained`` loads the backbone from.
        model_type, num_layers: of the backbone, checked on load.
    """

    exit_layers: list[int]
    num_layers: int
    model_type: str
    head: dict = field(default_factory=lambda: {"type": "ffn"})
    confidence_hidden: int = 64
    top_k: int = 1
    threshold: float = 0.9
    cache_strategy: str | None = None
    base_model_name_or_path: str | None = None
    format: str = FORMAT

    def __post_init__(self) -> None:
        layers = list(self.exit_layers)
        if not layers:
            raise ValueError("exit_layers is empty: give at least one layer in [1, num_layers - 1]")
        bad = [k for k in layers if not 1 <= k < self.num_layers]
        if bad:
            raise ValueError(f"exit_layers {bad} out of range: each must be in [1, {self.num_layers - 1}] "
                             f"for a {self.num_layers}-layer model")
        if layers != sorted(set(layers)):
            raise ValueError(f"exit_layers must be strictly increasing, got {layers}")
        if "type" not in self.head:
            raise ValueError("head must name its type, e.g. {'type': 'ffn'}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.format != FORMAT:
            raise ValueError(f"checkpoint format {self.format!r} is not {FORMAT!r}: it was written by another "
                             "offramp version; retrain the exits or load it with that version")

    def to_dict(self) -> dict:
        from offramp import __version__

        return {**asdict(self), "offramp_version": __version__}

    @classmethod
    def from_dict(cls, data: dict) -> "DecoderExitConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"offramp_version"})
        if unknown:
            warnings.warn(f"ignoring unknown offramp config keys: {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class DecoderExitOutput:
    """All exits on a full sequence (training, analysis).

    Attributes:
        exit_features: one (b, t, d) tensor per exit.
        confidence_logits: (b, t, n_exits) confidence classifier logits.
        final_logits: (b, t, V) logits of the full model.
    """

    exit_features: list[Tensor]
    confidence_logits: Tensor
    final_logits: Tensor


class DecoderExitModel(nn.Module):
    """Backbone (frozen, by reference) + one exit head and one confidence classifier per exit."""

    def __init__(self, backbone: nn.Module, config: DecoderExitConfig) -> None:
        super().__init__()
        self.adapter: DecoderAdapter = adapter_for(backbone, role="decoder")
        if config.num_layers != self.adapter.num_layers or config.model_type != backbone.config.model_type:
            raise ValueError(f"exit config is for a {config.num_layers}-layer {config.model_type!r} model, the "
                             f"backbone is a {self.adapter.num_layers}-layer {backbone.config.model_type!r}")
        self.config = config
        self._backbone = [backbone]  # by reference: not a submodule, not in state_dict
        d = self.adapter.hidden_size
        kwargs = {k: v for k, v in config.head.items() if k != "type"}
        self.heads = nn.ModuleList(build_lm_head(config.head["type"], d, **kwargs) for _ in config.exit_layers)
        self.confidence = nn.ModuleList(ConfidenceHead(d, config.confidence_hidden) for _ in config.exit_layers)
        device = self.adapter.head_device
        self.to(device=device, dtype=self.adapter.dtype)

    @property
    def backbone(self) -> nn.Module:
        return self._backbone[0]

    @property
    def exit_layers(self) -> list[int]:
        return list(self.config.exit_layers)

    @classmethod
    def from_backbone(cls, backbone: nn.Module, exit_layers: list[int] | None = None, head: str | dict = "ffn",
                      **kwargs: Any) -> "DecoderExitModel":
        """New, untrained exits on ``backbone`` (default: 5 exits in its second half)."""
        adapter = adapter_for(backbone, role="decoder")
        layers = exit_layers if exit_layers is not None else default_exit_layers(adapter.num_layers)
        head = {"type": head} if isinstance(head, str) else dict(head)
        kwargs.setdefault("base_model_name_or_path", getattr(backbone, "name_or_path", None) or None)
        cfg = DecoderExitConfig(exit_layers=list(layers), num_layers=adapter.num_layers,
                                model_type=backbone.config.model_type, head=head, **kwargs)
        return cls(backbone, cfg)

    # ---- pieces the engine calls -----------------------------------------------------------
    def features(self, index: int, hidden: Tensor, cache: Any = None, mask: Tensor | None = None) -> Tensor:
        head: LMExitHead = self.heads[index]
        return head(hidden.to(self.adapter.head_device), cache=cache, mask=mask)

    def confidence_logit(self, index: int, features: Tensor) -> Tensor:  # (b, t, d) -> (b, t)
        return self.confidence[index](features)

    def exit_logits(self, features: Tensor) -> Tensor:  # (b, t, d) -> (b, t, V)
        return self.adapter.logits(features)

    # ---- training / analysis ---------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> DecoderExitOutput:
        """Run the frozen backbone once and every exit head on the full sequence."""
        with torch.no_grad():
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                use_cache=False)
        mask = attention_mask if attention_mask is not None and bool((attention_mask == 0).any()) else None
        feats = [self.features(e, self.adapter.hidden_after(out.hidden_states, k).detach(), mask=mask)
                 for e, k in enumerate(self.exit_layers)]
        conf = torch.stack([self.confidence_logit(e, f) for e, f in enumerate(feats)], dim=-1)
        return DecoderExitOutput(exit_features=feats, confidence_logits=conf, final_logits=out.logits.detach())

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any):
        """``offramp.engines.generate.generate`` with this model's default threshold and strategy."""
        from offramp.engines.generate import generate

        kwargs.setdefault("threshold", self.config.threshold)
        kwargs.setdefault("cache_strategy", self.config.cache_strategy)
        return generate(self, input_ids, attention_mask, **kwargs)

    # ---- save / load -------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write the config and the exit-head weights (not the backbone) atomically to ``path``."""
        from safetensors.torch import save_file

        from offramp.utils import atomic_dir

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_dir(path) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})

    @classmethod
    def from_pretrained(cls, path: str | Path, backbone: nn.Module | None = None,
                        **backbone_kwargs: Any) -> "DecoderExitModel":
        """Load exits saved by ``save_pretrained``; the backbone is ``backbone`` or loaded by reference."""
        from offramp.utils import load_safetensors, read_json, readable_dir

        path = readable_dir(path)
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} has no {CONFIG_NAME}: not a saved DecoderExitModel")
        fix = "fit the exits again (offramp generate --fit-exits)"
        try:
            cfg = DecoderExitConfig.from_dict(read_json(path / CONFIG_NAME, "decoder exits config", fix))
        except (TypeError, KeyError) as e:
            raise ValueError(f"{path / CONFIG_NAME}: not a valid decoder exits config ({e}); {fix}") from None
        if backbone is None:
            if not cfg.base_model_name_or_path:
                raise ValueError("the checkpoint names no base model: pass backbone=")
            from transformers import AutoModelForCausalLM

            from offramp.modeling import load_hf_model

            backbone_kwargs.setdefault("dtype", torch.float32)
            backbone = load_hf_model(AutoModelForCausalLM, cfg.base_model_name_or_path, "backbone",
                                     **backbone_kwargs).eval()
        model = cls(backbone, cfg)
        state = load_safetensors(path / WEIGHTS_NAME, "exit heads", fix, device=str(model.adapter.head_device))
        from offramp.modeling import shape_mismatches

        wrong = shape_mismatches(model, state)
        missing = sorted(set(model.state_dict()) - set(state))
        if wrong or missing:
            raise ValueError(f"{path / WEIGHTS_NAME} does not match {CONFIG_NAME} and this backbone "
                             f"({'; '.join(wrong[:3]) or 'missing ' + ', '.join(missing[:3])}); {fix}")
        model.load_state_dict(state, strict=False)
        return model
