"""LayerSkip's training recipe for decoders (Elhoushi et al., 2024), as losses and schedules.

Two parts, each a function of the training step ``t`` of ``T`` and the layer:

- **Layer dropout rising with depth.** Layer ``l`` (0-based, of ``L``) is skipped for a row with
  probability ``p(l, t) = S(t) D(l) p_max`` where ``D(l) = exp(l ln2 / (L-1)) - 1`` (0 at the first
  layer, 1 at the last) and ``S(t)`` is the time curriculum: ``"constant"`` (1, for continued
  training) or ``"exp"`` (``exp(t ln2 / (T-1)) - 1``: rising from 0, for training from scratch).
- **Early-exit loss.** Every exit's hidden state goes through the model's own final norm and LM
  head; the loss is ``sum_l e~(t, l) CE_l`` with ``e~ = C(t, l) e_l / sum_i C(t, i) e_i``: the
  scale ``e_l`` grows with depth (``e_scale * sum_{i<=l} i`` for early layers, the last layer gets
  ``L-1 + e_scale * sum_{i<=L-2} i``; with ``weighting="uniform"`` every early exit weighs
  ``e_scale`` and the last layer 1, for drafting exits that must be strong well before the last
  layer) and the curriculum ``C`` says which exits are on at step
  ``t``: ``"none"`` (all), ``"rotational"`` (every ``rotation``-th exit, shifted by one each step)
  or ``"gradual"`` (exits switched on from the last layer down to the first over the first half
  of training). The last layer is always on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

CURRICULA = ("none", "rotational", "gradual")
WEIGHTINGS = ("depth", "uniform")
DROPOUT_CURRICULA = ("constant", "exp")


def layer_dropout_rates(num_layers: int, p_max: float, step: int = 0, total_steps: int = 1,
                        curriculum: str = "constant") -> Tensor:
    """``p(l, t)`` for every layer l = 0 .. L-1 (a float tensor of length ``num_layers``)."""
    if not 0.0 <= p_max < 1.0:
        raise ValueError(f"layer dropout p_max must be in [0, 1), got {p_max}")
    if curriculum not in DROPOUT_CURRICULA:
        raise ValueError(f"unknown layer-dropout curriculum {curriculum!r}; choose one of {DROPOUT_CURRICULA}")
    depth = torch.arange(num_layers, dtype=torch.float64)
    d = torch.exp(depth * math.log(2) / max(num_layers - 1, 1)) - 1
    s = 1.0 if curriculum == "constant" else math.exp(step * math.log(2) / max(total_steps - 1, 1)) - 1
    return (min(max(s, 0.0), 1.0) * d * p_max).float()


def exit_loss_scales(exit_layers: Sequence[int], num_layers: int, e_scale: float = 1.0,
                     weighting: str = "depth") -> Tensor:
    """``e_l`` for each exit (layers run, 1-based; ``num_layers`` = the last layer's output):
    LayerSkip's scale growing with depth (``"depth"``) or ``e_scale`` for every early exit and 1
    for the last layer (``"uniform"``)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown early-exit loss weighting {weighting!r}; choose one of {WEIGHTINGS}")
    out = []
    for k in exit_layers:
        if not 1 <= k <= num_layers:
            raise ValueError(f"exit layer {k} is outside 1..{num_layers}")
        idx = k - 1  # 0-based layer whose output the exit reads
        if weighting == "uniform":
            out.append(1.0 if k == num_layers else e_scale)
        elif k == num_layers:
            out.append(num_layers - 1 + e_scale * sum(range(num_layers - 1)))
        else:
            out.append(e_scale * sum(range(idx + 1)))
    return torch.tensor(out, dtype=torch.float32)


def curriculum_mask(exit_layers: Sequence[int], num_layers: int, step: int, total_steps: int,
                    curriculum: str = "rotational", rotation: int = 2) -> Tensor:
    """Which exits (bool per exit) the early-exit loss uses at ``step``; the last layer is always on."""
    if curriculum not in CURRICULA:
        raise ValueError(f"unknown early-exit curriculum {curriculum!r}; choose one of {CURRICULA}")
    if rotation < 1:
        raise ValueError(f"rotation must be >= 1, got {rotation}")
    on = []
    for k in exit_layers:
        if k == num_layers or curriculum == "none":
            on.append(True)
        elif curriculum == "rotational":
            on.append((k - 1 - step) % rotation == 0)
        else:  # gradual: layer k joins once step >= (L - k) * T / (2 L)
            on.append(step >= (num_layers - k) * total_steps / (2 * num_layers))
    return torch.tensor(on)


def early_exit_loss(losses: Tensor, scales: Tensor, mask: Tensor) -> Tensor:
    """``sum_l e~_l CE_l`` over the exits that are on (``losses``, ``scales``, ``mask``: one per exit)."""
    w = scales.to(losses) * mask.to(losses)
    total = w.sum()
    if float(total) <= 0:
        raise ValueError("every exit that is on has a zero loss scale: include the last layer (scale L-1 > 0)")
    return (w * losses).sum() / total
