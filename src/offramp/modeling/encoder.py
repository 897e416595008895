"""EarlyExitModel: a Hugging Face encoder with exit classifiers (and a halting layer) on its layers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import AutoModel

from offramp.backbones import adapter_for
from offramp.backbones.base import check_ids
from offramp.config import CONFIG_NAME, OfframpConfig
from offramp.engines.classify import early_exit_predict, on_device
from offramp.heads.classifier import ExitClassifiers
from offramp.heads.gate import build_gates
from offramp.heads.halting import HaltingLayer, exit_log_distribution
from offramp.modeling.base import ExitModelBase, load_hf_model, load_hf_tokenizer
from offramp.objectives import compute_loss
from offramp.outputs import EarlyExitOutput, Prediction
from offramp.policies import ExitPolicy, named_or_stored
from offramp.utils import readable_dir

BACKBONE_DIR = "backbone"


def _load_backbone(spec: str | os.PathLike | nn.Module, **kwargs: Any) -> nn.Module:
    if isinstance(spec, nn.Module):
        base = getattr(spec, "base_model", spec)
        return base
    return load_hf_model(AutoModel, spec, "backbone", **kwargs)


class EarlyExitModel(ExitModelBase):
    """A HF encoder backbone with exits (checkpoint kind ``classifier``). Build with
    ``from_backbone`` or ``from_pretrained``.

    ``forward`` runs every layer and returns all exits (for training and traces); ``predict``
    runs each row only as deep as the exit policy says, dropping rows from the running batch as
    they exit.
    """

    kind: ClassVar[str] = "classifier"
    config_class: ClassVar[type] = OfframpConfig

    def __init__(self, backbone: nn.Module, config: OfframpConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter_for(backbone, role="encoder")
        self.tokenizer = tokenizer
        config.backbone_model_type = backbone.config.model_type
        n = self.adapter.num_layers
        layers = list(range(1, n + 1)) if config.exit_layers is None else list(config.exit_layers)
        if layers[-1] > n:
            raise ValueError(f"exit_layers {layers} go past the backbone's {n} layers; use numbers in 1..{n}")
        self.config = config
        self._exit_layers = layers
        self.exit_index_of = {layer: i for i, layer in enumerate(layers)}  # layers run -> exit index
        h = self.adapter.hidden_size
        head = config.head
        pooler = self.adapter.pooler() if head["use_pooler"] and head["pooling"] == "cls" else None
        self.classifiers = ExitClassifiers(h, config.num_labels, len(layers), shared=head["shared"],
                                           pooling=head["pooling"], dropout=head["dropout"], pooler=pooler,
                                           kind=head["type"], mlp_hidden=head["hidden"])
        self.halting = HaltingLayer(h, len(layers), **config.halting) if config.halting else None
        self.gates = self._build_gates()

    def _build_gates(self) -> nn.Module | None:
        if not self.config.gate:
            return None

        return build_gates(self.config.gate, len(self.exit_layers))

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone: str | os.PathLike | nn.Module, config: OfframpConfig,
                      tokenizer: Any = None, **load_kwargs: Any) -> "EarlyExitModel":
        """Add exits to a HF encoder given as a model, a local folder or a Hub id."""
        model = _load_backbone(backbone, **load_kwargs)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = (str(backbone) if not isinstance(backbone, nn.Module)
                                              else getattr(model.config, "_name_or_path", None) or None)
        if tokenizer is None and not isinstance(backbone, nn.Module):
            try:
                tokenizer = load_hf_tokenizer(str(backbone))
            except ValueError as e:
                if str(e).startswith("refused"):
                    raise
                tokenizer = None
        return cls(model, config, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Train exits only (frozen) or everything (full fine-tuning)."""
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)

    # -- all exits ------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, labels: Tensor | None = None,
                output_pooled: bool = False, pooled: Tensor | None = None) -> EarlyExitOutput:
        """All exits for a batch. ``pooled`` (E, b, d) from ``pooled_states`` skips the backbone."""
        if pooled is None:
            if input_ids is None:
                raise ValueError("give input_ids (or pooled states from pooled_states())")
            pooled = self._run_pooled(input_ids, attention_mask, token_type_ids)
        return self.forward_pooled(pooled, labels, output_pooled=output_pooled)

    def _run_pooled(self, input_ids: Tensor, attention_mask: Tensor | None,
                    token_type_ids: Tensor | None) -> Tensor:  # (E, b, d)
        attention_mask = check_ids(input_ids, attention_mask)
        input_ids, attention_mask, token_type_ids = on_device(self.device, input_ids, attention_mask, token_type_ids)
        a = self.adapter
        hidden = a.embed(input_ids, token_type_ids)  # (b, t, d)
        ctx = a.context(hidden, attention_mask)
        pooled = []
        for i in range(self.exit_layers[-1]):
            hidden = a.run_layer(i, hidden, ctx)
            if i + 1 in self.exit_index_of:
                pooled.append(self.classifiers.pool(hidden, attention_mask))
        return torch.stack(pooled)

    def forward_pooled(self, pooled: Tensor, labels: Tensor | None = None,
                       output_pooled: bool = False) -> EarlyExitOutput:
        """Everything after the backbone, from pooled states (E, b, d): heads, halting, gates, loss.

        With a frozen backbone the pooled states never change, so training can compute them once
        (``TrainingArgs(cache_backbone=True)``) and run only this part each epoch; the pooler
        and the pooling are part of the frozen computation.
        """
        out = EarlyExitOutput(exit_logits=self.classifiers.all_exits(pooled))
        if self.halting is not None:
            out.halting_logits = self.halting(pooled)
            obj = self.config.objective
            out.halting_probs = exit_log_distribution(
                out.halting_logits, obj.get("truncation", "force_last"), obj.get("epsilon", 0.05)).exp()
        if self.gates is not None:
            out.gate_logits = self.gates(out.exit_logits)
        if output_pooled or (labels is not None and self.config.objective.get("converge")):
            out.pooled = pooled
        if labels is not None:
            out.loss = compute_loss(self, out, self.check_labels(labels))
        return out

    @torch.no_grad()
    def pooled_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      token_type_ids: Tensor | None = None) -> Tensor:  # (E, b, d)
        """The pooled hidden state at every exit (no grad): what ``forward(pooled=...)`` takes."""
        return self._run_pooled(input_ids, attention_mask, token_type_ids)

    def check_labels(self, labels: Tensor) -> Tensor:
        if self.config.is_regression:
            return labels.float().reshape(-1)
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.config.num_labels):
            raise ValueError(f"labels out of range: got values in [{int(labels.min())}, {int(labels.max())}] "
                             f"but the model has {self.config.num_labels} classes (0..{self.config.num_labels - 1})")
        return labels

    # -- real early exit ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                policy: str | dict | ExitPolicy | None = None, token_type_ids: Tensor | None = None,
                labels: Tensor | None = None) -> Prediction:
        """Per-row early-exit inference. ``policy`` defaults to the config's policy; a rule named
        without its setting (``"entropy"``) is the config's when the config stores that rule, and
        an error otherwise (``offramp.policies.named_or_stored``)."""
        pol = named_or_stored(policy, self.config.policy)
        return early_exit_predict(self, input_ids, attention_mask, pol, token_type_ids=token_type_ids,
                                  labels=labels)

    # -- save / load ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, save_backbone: bool = True) -> None:
        """Write offramp_config.json + offramp_heads.safetensors (+ backbone/ and the tokenizer).

        The folder is built under a temporary name and swapped into place, so an interrupted save
        leaves the previous checkpoint intact. With ``save_backbone=False`` the backbone is loaded
        from ``config.base_model_name_or_path`` again (use it for a frozen backbone).
        """
        super().save_pretrained(directory, save_backbone=save_backbone)

    def _write_extra(self, folder: Path, save_backbone: bool = True) -> None:
        if save_backbone:
            self.backbone.save_pretrained(folder / BACKBONE_DIR)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)

    @classmethod
    def _resolve(cls, folder: Path) -> Path:
        if not (folder / CONFIG_NAME).is_file() and (readable_dir(folder / "checkpoint") / CONFIG_NAME).is_file():
            return readable_dir(folder / "checkpoint")  # a training output folder
        return folder

    @classmethod
    def _parts(cls, directory: Path, config: OfframpConfig, **load_kwargs: Any) -> tuple:
        source = directory / BACKBONE_DIR
        if not source.is_dir():
            if not config.base_model_name_or_path:
                raise ValueError(f"{directory} has no backbone/ folder and its config names no base model")
            source = config.base_model_name_or_path
        backbone = _load_backbone(source, **load_kwargs)
        tokenizer = None
        if (directory / "tokenizer_config.json").is_file():
            tokenizer = load_hf_tokenizer(directory, "checkpoint's tokenizer")
        return backbone, config, tokenizer

    # -- text convenience -----------------------------------------------------------------------
    def encode(self, texts: list[str], max_length: int = 128) -> dict[str, Tensor]:
        """Tokenise texts with the model's tokenizer (ValueError on an empty list or empty text)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass input_ids, or build it from a name or path")
        if not texts:
            raise ValueError("empty batch: give at least one text")
        empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise ValueError(f"empty text at position(s) {empty}: every input needs some text")
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def classify(self, texts: list[str], policy: str | dict | ExitPolicy | None = None, *,
                 max_length: int = 128) -> list[dict[str, Any]]:
        """Texts in, one dict per text out: ``label`` (the class name when the config has
        ``label_names``, else the class id), ``confidence`` (its softmax probability) and
        ``exit_layer`` (how deep the text ran), by real per-row early exit under ``policy`` (default:
        the config's). For regression, ``value`` instead of label and confidence."""
        pred = self.predict(**self.encode(list(texts), max_length=max_length), policy=policy)
        return self.prediction_rows(texts, pred)

    def prediction_rows(self, texts: list[str], pred: Prediction) -> list[dict[str, Any]]:
        """The rows of :meth:`classify` for ``texts`` and their :class:`Prediction`."""
        names = self.config.label_names
        rows = []
        for text, logits, layer in zip(texts, pred.logits.float(), pred.exit_layer.tolist()):
            if self.config.is_regression:
                rows.append({"text": text, "value": float(logits[0]), "exit_layer": int(layer)})
                continue
            probs = torch.softmax(logits, -1)
            k = int(probs.argmax())
            rows.append({"text": text, "label": names[k] if names else k,
                         "confidence": round(float(probs[k]), 4), "exit_layer": int(layer)})
        return rows
