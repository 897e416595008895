"""A decoder LM with token exits: the (frozen) HF backbone + exit heads + confidence classifiers.

``DecoderExitModel`` (checkpoint kind ``token_exits``) holds the backbone by reference.
``save_pretrained`` writes ``offramp_config.json`` (with ``base_model_name_or_path`` and the default
exit policy) and ``offramp_heads.safetensors`` (the exit heads and confidence classifiers only);
``from_pretrained`` loads the backbone by that reference (or takes one you pass) and restores the
heads. A model trained to exit carries its exits in its own folder (base ``"."``: that folder).
Folders of the previous release (``offramp_exit_heads.safetensors``, format
``decoder-exits/1``) load as they are.

Exit layers count layers run: exit ``k`` reads the hidden state after ``k`` layers, 1 <= k < L.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from offramp.backbones import DecoderAdapter, adapter_for
from offramp.config import DecoderExitConfig
from offramp.engines.generate import generate as exit_generate
from offramp.engines.generate import speculative_generate as self_speculate
from offramp.heads import build_lm_head
from offramp.heads.lm import ConfidenceHead, LMExitHead
from offramp.modeling.base import ExitModelBase, load_hf_model
from offramp.outputs import DecoderExitOutput

LEGACY_WEIGHTS = "offramp_exit_heads.safetensors"  # the previous release's head file
SELF = "."  # base model "." : the exits live in the model's own folder (a model trained to exit)


def base_model_of(folder: str | Path, name: str | None) -> str | None:
    """Where a token-exits folder's backbone loads from: its recorded name, or the folder itself
    when the exits were saved with the model (``"."``)."""
    return str(folder) if name == SELF else name


def default_exit_layers(num_layers: int, count: int = 5) -> list[int]:
    """``count`` evenly spaced exits in the second half of ``num_layers`` layers (DYNAMAX)."""
    first = max(1, num_layers // 2)
    span = list(range(first, num_layers))
    if len(span) <= count:
        return span
    step = len(span) / count
    return sorted({span[int(i * step)] for i in range(count)})


class DecoderExitModel(ExitModelBase):
    """Backbone (frozen, by reference) + one exit head and one confidence classifier per exit."""

    kind: ClassVar[str] = "token_exits"
    config_class: ClassVar[type] = DecoderExitConfig
    legacy_heads: ClassVar[tuple[str, ...]] = (LEGACY_WEIGHTS,)
    fix: ClassVar[str] = "fit the exits again (offramp fit-exits)"

    def __init__(self, backbone: nn.Module, config: DecoderExitConfig) -> None:
        super().__init__()
        self.adapter: DecoderAdapter = adapter_for(backbone, role="decoder")
        if config.num_layers != self.adapter.num_layers or config.model_type != backbone.config.model_type:
            raise ValueError(f"exit config is for a {config.num_layers}-layer {config.model_type!r} model, the "
                             f"backbone is a {self.adapter.num_layers}-layer {backbone.config.model_type!r}")
        self.config = config
        self._exit_layers = list(config.exit_layers)
        self._backbone = [backbone]  # by reference: not a submodule, not in state_dict
        d = self.adapter.hidden_size
        kwargs = {k: v for k, v in config.head.items() if k != "type"}
        self.heads = nn.ModuleList(build_lm_head(config.head["type"], d, **kwargs) for _ in config.exit_layers)
        self.confidence = nn.ModuleList(ConfidenceHead(d, config.confidence_hidden) for _ in config.exit_layers)
        if not any(p.is_meta for p in self.parameters()):  # on the meta device: a shell whose shapes are checked
            self.to(device=self.adapter.head_device, dtype=self.adapter.dtype)

    @property
    def backbone(self) -> nn.Module:
        return self._backbone[0]

    @classmethod
    def from_backbone(cls, backbone: nn.Module | str | Path, exit_layers: list[int] | None = None,
                      head: str | dict = "ffn", **kwargs: Any) -> "DecoderExitModel":
        """New, untrained exits on ``backbone`` (a HF causal LM, a local folder or a Hub id; default:
        5 exits in its second half)."""
        if not isinstance(backbone, nn.Module):
            from transformers import AutoModelForCausalLM

            kwargs.setdefault("base_model_name_or_path", str(backbone))
            backbone = load_hf_model(AutoModelForCausalLM, backbone, "backbone", dtype=torch.float32).eval()
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
        """``offramp.engines.generate.generate`` with this model's default policy and cache strategy."""
        if kwargs.get("policy") is None and kwargs.get("threshold") is None:
            kwargs["policy"] = self.config.policy
        kwargs.setdefault("cache_strategy", self.config.cache_strategy)
        return exit_generate(self, input_ids, attention_mask, **kwargs)

    def speculative_generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any):
        """Lossless self-speculation (``offramp.engines.generate.speculative``): an exit drafts, the
        layers after it verify; the output is greedy decoding's."""
        return self_speculate(self, input_ids, attention_mask, **kwargs)

    # ---- save / load -------------------------------------------------------------------------
    @classmethod
    def _parts(cls, folder: Path, config: DecoderExitConfig, backbone: nn.Module | None = None,
               **backbone_kwargs: Any) -> tuple:
        if backbone is None:
            if not config.base_model_name_or_path:
                raise ValueError(f"{folder}: the checkpoint names no base model: pass backbone=")
            from transformers import AutoModelForCausalLM

            backbone_kwargs.setdefault("dtype", torch.float32)
            backbone = load_hf_model(AutoModelForCausalLM, base_model_of(folder, config.base_model_name_or_path),
                                     "backbone",
                                     **backbone_kwargs).eval()
        return backbone, config
