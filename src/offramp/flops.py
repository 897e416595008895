"""FLOPs of each exit counted from the model's shapes (not estimated by a constant).

Convention: a matrix product of (m, k) by (k, n) costs 2·m·k·n FLOPs; softmax costs 3 per score
(exp, sum, divide) plus 1 for the scaling; a layer norm 5 per element, an RMS norm 4; an activation
1 per element; a residual add 1 per element. Biases, dropout and embedding lookups are free.
Everything is per example at sequence length ``T`` (a number, or an array of per-example lengths:
the result is then the mean over examples, which keeps attention's T² exact).

The cost of exit k (at layer ℓ_k) is the embeddings + ℓ_k layers + the exit heads (and halting
layers or gates) of exits 0..k, all of which ran before the row left. The plain model's cost is the
embeddings + every layer + one head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from offramp.backbones import ADAPTERS

LN_FLOPS, RMS_FLOPS = 5, 4


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    if default is not None:
        return default
    raise ValueError(f"the model config has none of the fields {names}: cannot count its FLOPs")


@dataclass(frozen=True)
class Shapes:
    """The sizes that set a layer's cost, read from a Hugging Face config."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    embedding: int
    state: int = 0
    conv: int = 0
    dt_rank: int = 0
    ssm: bool = False  # a Mamba block (the adapter's kind)
    gated: bool = False  # a gated MLP (the adapter's gated_mlp)

    @classmethod
    def from_config(cls, cfg: Any) -> "Shapes":
        """Shapes of ``cfg`` (a transformers PretrainedConfig or anything with the same fields)."""
        mt = str(getattr(cfg, "model_type", "") or "")
        adapter = ADAPTERS.get(mt)  # the shape knowledge lives in the adapters
        ssm, gated = (adapter.kind == "ssm", adapter.gated_mlp) if adapter is not None else (False, False)
        hidden = int(_get(cfg, "hidden_size", "d_model", "n_embd", "dim"))
        layers = int(_get(cfg, "num_hidden_layers", "n_layer", "n_layers", "num_layers"))
        if ssm:
            inter = int(_get(cfg, "intermediate_size", default=2 * hidden))
            rank = getattr(cfg, "time_step_rank", None)
            rank = int(np.ceil(hidden / 16)) if rank in (None, "auto") else int(rank)
            return cls(mt, hidden, layers, 1, 1, inter, hidden, int(_get(cfg, "state_size", default=16)),
                       int(_get(cfg, "conv_kernel", default=4)), rank, ssm=True)
        heads = int(_get(cfg, "num_attention_heads", "n_head", "n_heads"))
        kv = int(_get(cfg, "num_key_value_heads", default=heads))
        inter = int(_get(cfg, "intermediate_size", "n_inner", "hidden_dim", default=4 * hidden))
        emb = int(_get(cfg, "embedding_size", default=hidden))
        return cls(mt, hidden, layers, heads, kv, inter, emb, gated=gated)


def _layer_parts(shapes: Shapes, elementwise: bool = True) -> tuple[float, float]:
    """(per-token cost, per pair of tokens cost) of one layer: a layer over t tokens costs
    linear * t + quadratic * t^2; one decoded token attending to c tokens, linear + quadratic * c."""
    s = shapes
    ew = 1.0 if elementwise else 0.0
    if s.ssm:
        e, n = s.intermediate, s.state
        matmul = (2 * s.hidden * 2 * e + 2 * e * (s.dt_rank + 2 * n) + 2 * s.dt_rank * e
                  + 2 * e * s.hidden)
        other = 2 * e * s.conv + 8 * e * n + 3 * e + RMS_FLOPS * s.hidden + s.hidden
        return float(matmul + ew * other), 0.0
    h, d = s.hidden, s.hidden // s.heads
    kv = s.kv_heads * d
    gated = s.gated
    proj = 2 * h * h * 2 + 2 * h * kv * 2  # Q, O and K, V projections, per token
    mlp = 2 * h * s.intermediate * (3 if gated else 2)
    scores = 2 * 2 * h  # QK^T and PV: 2·d per head per pair of tokens, both
    act = s.intermediate * (2 if gated else 1)
    norm = (RMS_FLOPS if gated else LN_FLOPS) * h * 2 + 2 * h  # two norms, two residual adds
    softmax = 4 * s.heads  # scale, exp, sum, divide per score
    return float(proj + mlp + ew * (act + norm)), float(scores + ew * softmax)


def layer_flops(shapes: Shapes, seq_len: float | np.ndarray, *, elementwise: bool = True) -> float:
    """FLOPs of one layer for one example of ``seq_len`` tokens (mean over an array of lengths).

    ``elementwise=False`` counts the matrix products only (what ``torch.utils.flop_counter`` sees).
    """
    t = np.asarray(seq_len, dtype=np.float64)
    linear, quadratic = _layer_parts(shapes, elementwise)
    return float(np.mean(linear * t + quadratic * t * t))


def decode_layer_flops(shapes: Shapes, context: float | np.ndarray, *, elementwise: bool = True) -> float:
    """FLOPs of one layer for ONE decoded token attending to ``context`` tokens (a KV cache step;
    Mamba's step is independent of the context)."""
    c = np.asarray(context, dtype=np.float64)
    linear, quadratic = _layer_parts(shapes, elementwise)
    return float(np.mean(linear + quadratic * c))


def embedding_flops(shapes: Shapes, seq_len: float | np.ndarray) -> float:
    """FLOPs of the embedding block (position / type adds, norm, ALBERT's projection)."""
    t = np.asarray(seq_len, dtype=np.float64)
    s = shapes
    if s.ssm or s.gated:
        return 0.0  # a lookup only
    per_token = 2 * s.embedding + LN_FLOPS * s.embedding
    if s.embedding != s.hidden:
        per_token += 2 * s.embedding * s.hidden
    return float(np.mean(per_token * t))


def head_flops(shapes: Shapes, seq_len: float | np.ndarray, *, num_labels: int,
               head: Mapping[str, Any] | None = None) -> float:
    """FLOPs of one exit head: pooling (CLS with the model's pooler, or mean) + classifier."""
    head = dict(head or {})
    h = shapes.hidden
    t = float(np.mean(np.asarray(seq_len, dtype=np.float64)))
    pooling = head.get("pooling", "cls")
    pool = t * h + h if pooling == "mean" else 0.0
    if pooling != "mean" and head.get("use_pooler", True) and head.get("has_pooler", False):
        pool += 2 * h * h + h
    hidden = head.get("hidden_size") or head.get("hidden")
    if hidden:  # an MLP head: Linear(h, hidden) -> act -> Linear(hidden, c)
        return pool + 2 * h * int(hidden) + int(hidden) + 2 * int(hidden) * num_labels
    return pool + 2 * h * num_labels


def halting_flops(shapes: Shapes, halting: Mapping[str, Any] | None) -> float:
    """FLOPs of one halting layer: PonderNet Λ on H, PALBERT's revisited Λ on 2H (concat), H (diff)
    or a GRU cell then H (rnn); ``num_layers`` × [Linear → Tanh] then Linear(·, 1). 0 without one."""
    if not halting:
        return 0.0
    h = shapes.hidden
    palbert = halting.get("type", "palbert") == "palbert"
    variant = halting.get("variant", "concat")
    width = 2 * h if (palbert and variant == "concat") else h
    gru = 2 * 3 * (2 * h * h) + 12 * h if (palbert and variant == "rnn") else 0
    n = int(halting.get("num_layers", 1) or 0)
    return gru + h + n * (2 * width * width + 2 * width) + 2 * width


def gate_flops(gate: Mapping[str, Any] | None, num_labels: int) -> float:
    """FLOPs of one JEI-DNN gate on the four uncertainty features of π (softmaxes included)."""
    if not gate:
        return 0.0
    return 4 * 3 * num_labels + 2 * 4 + 1


@dataclass(frozen=True)
class ExitFlops:
    """Per-example FLOPs of every exit and of the plain model.

    Attributes:
        exit_layers: 1-based layer of each exit.
        per_exit: (E,) cumulative FLOPs of a row that leaves at each exit.
        full: the plain model without exits (embeddings + all layers + one head).
        embeddings, layer, head, extra: the parts (extra = halting layer or gate per exit).
    """

    exit_layers: tuple[int, ...]
    per_exit: np.ndarray
    full: float
    embeddings: float
    layer: float
    head: float
    extra: float

    def mean(self, exit_index: np.ndarray) -> float:
        """Mean FLOPs of rows leaving at ``exit_index`` ((n,) 0-based exits)."""
        return float(self.per_exit[np.asarray(exit_index, dtype=np.int64)].mean())

    def to_dict(self) -> dict:
        return {"exit_layers": list(self.exit_layers), "per_exit": self.per_exit.tolist(),
                "full": self.full, "embeddings": self.embeddings, "layer": self.layer,
                "head": self.head, "extra": self.extra}


def exit_flops(hf_config: Any, exit_layers: Sequence[int], *, num_labels: int,
               seq_len: float | np.ndarray, head: Mapping[str, Any] | None = None,
               halting: Mapping[str, Any] | None = None,
               gate: Mapping[str, Any] | None = None) -> ExitFlops:
    """Count the FLOPs of each exit of an early-exit model.

    Args:
        hf_config: the backbone's Hugging Face config (hidden size, heads, layers, MLP width...).
        exit_layers: 1-based layer number of each exit, ascending.
        num_labels: classes of the heads (1 for regression).
        seq_len: tokens per example, or an array of per-example lengths (the mean is taken).
        head: the head config (``pooling``, ``use_pooler``, ``has_pooler``, ``hidden_size``).
        halting: the halting-layer config, if any (``type``, ``variant``, ``num_layers``).
        gate: the exit-gate config, if any.
    """
    shapes = Shapes.from_config(hf_config)
    layers = list(exit_layers)
    if not layers or layers != sorted(set(layers)) or layers[0] < 1 or layers[-1] > shapes.layers:
        raise ValueError(f"exit_layers must be ascending distinct layer numbers in 1..{shapes.layers}, "
                         f"got {layers}")
    emb = embedding_flops(shapes, seq_len)
    lay = layer_flops(shapes, seq_len)
    hd = head_flops(shapes, seq_len, num_labels=num_labels, head=head)
    extra = halting_flops(shapes, halting) + gate_flops(gate, num_labels)
    per_exit = np.array([emb + lay * layer + (hd + extra) * (k + 1) for k, layer in enumerate(layers)])
    full = emb + lay * shapes.layers + hd
    return ExitFlops(tuple(layers), per_exit, float(full), emb, lay, hd, extra)


def model_exit_flops(model: Any, seq_len: float | np.ndarray) -> ExitFlops:
    """:func:`exit_flops` of an ``EarlyExitModel`` (reads its backbone config and offramp config)."""
    cfg = model.config
    hf_config = getattr(getattr(model, "backbone", None), "config", None)
    if hf_config is None:
        raise ValueError("the model has no backbone config to count FLOPs from")
    head = dict(getattr(cfg, "head", None) or {})
    adapter = getattr(model, "adapter", None)
    head.setdefault("has_pooler", adapter is not None and adapter.pooler() is not None)
    return exit_flops(hf_config, list(model.exit_layers), num_labels=int(cfg.num_labels),
                      seq_len=seq_len, head=head, halting=getattr(cfg, "halting", None),
                      gate=getattr(cfg, "gate", None))
