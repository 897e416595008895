"""JEI-DNN objectives: gate targets and class-weighted BCE; the reweighted inference-module loss.

Notation: E exits, CE_l the cross-entropy of exit l, c_l the cost of exit l (compute up to exit l
over the full compute, c_E = 1), g_l the gate values (g_E = 1: the last exit always exits).

- Gate phase (IMs frozen): l* = argmin_l CE_l + lambda c_l per sample; targets t_l = 1[l >= l*]
  for the gates l < E; BCE with a positive weight per gate (``pos_weight``, measured on the
  validation split): ``"none"`` (1, the default), ``"balanced"`` (#neg/#pos of each gate's targets,
  clipped to 5, as the paper states it) or ``"exact"`` (#(l* != l)/#(l* = l), clipped to 5, as the
  paper's code computes it). A gate trained without weights estimates P(l* <= l | x) and exits
  when it passes 1/2, so a larger lambda (more rows with an early l*) moves every gate towards
  exiting. The balanced weights put each gate's decision at its own base rate instead, which
  cancels most of that shift: with them, lambda barely moves the mean exit layer.
- IM phase (gates frozen): P_l = max(0, min(g_l, 1 - sum_{k<l} g_k));
  L_IM = mean_b sum_l P_l CE_l * (sum_l CE_l / sum_l P_l CE_l). The ratio is a constant (detached):
  without the detach the expression simplifies to sum_l CE_l and the weights have no effect, which
  is what the shipped reference code computes; ``reweight_detach=False`` reproduces that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from offramp.config import JEI_DEFAULTS, POS_WEIGHTS, check_jei_options
from offramp.flops import model_exit_flops

if TYPE_CHECKING:
    from offramp.modeling import EarlyExitModel, EarlyExitOutput


def ce_per_exit(exit_logits: Tensor, labels: Tensor) -> Tensor:  # (E, b, c), (b,) -> (E, b)
    """Cross-entropy of every exit and row."""
    e, b, c = exit_logits.shape
    if c < 2:
        raise ValueError("the JEI objective needs classification (num_labels >= 2)")
    return F.cross_entropy(exit_logits.reshape(e * b, c).float(), labels.repeat(e), reduction="none").view(e, b)


def gate_targets(ce: Tensor, costs: Tensor, cost_weight: float) -> tuple[Tensor, Tensor]:
    """Cumulative gate targets: t_l = 1[l >= l*] with l* = argmin_l CE_l + lambda c_l.

    Args:
        ce: (E, b) cross-entropy of every exit.
        costs: (E,) cost of every exit (c_E = 1).
        cost_weight: lambda.

    Returns:
        targets (b, E - 1) float (the gates of exits 0..E-2) and l* (b,) 0-based.
    """
    total = ce.detach().float() + cost_weight * costs.to(ce.device, torch.float32)[:, None]  # (E, b)
    best = total.argmin(0)  # (b,); ties go to the earliest exit
    gates = torch.arange(ce.shape[0] - 1, device=ce.device)
    return (gates[None, :] >= best[:, None]).float(), best


def gate_pos_weights(targets: Tensor, clip: float = 5.0, mode: str = JEI_DEFAULTS["pos_weight"]
                     ) -> Tensor:  # (n, E-1) -> (E-1,)
    """The gates' positive-class weights from cumulative targets (see the module docstring).

    ``"balanced"``: #neg / #pos per gate, clipped to ``clip`` (a gate with no positive gets ``clip``).
    ``"exact"``: #(l* != l) / #(l* = l) with the count floored at 0.1, clipped to ``clip``.
    ``"none"``: 1 for every gate.
    """
    if mode == "none":
        return torch.ones(targets.shape[1], dtype=torch.float32, device=targets.device)
    if mode == "exact":
        exact = torch.diff(targets, dim=1, prepend=torch.zeros_like(targets[:, :1])).sum(0).clamp_min(0.1)
        return ((targets.shape[0] - exact) / exact).clamp(max=clip)
    if mode != "balanced":
        raise ValueError(f"pos_weight mode must be one of {POS_WEIGHTS}, got {mode!r}")
    pos = targets.sum(0)
    neg = targets.shape[0] - pos
    return torch.where(pos > 0, neg / pos.clamp_min(1.0), torch.full_like(pos, clip)).clamp(max=clip)


def gate_loss(gate_logits: Tensor, targets: Tensor, pos_weight: Tensor) -> Tensor:
    """Class-weighted BCE of the gates: mean over rows and gates.

    Args:
        gate_logits: (b, E) or (b, E - 1) gate logits (a last +inf column is dropped).
        targets: (b, E - 1) cumulative targets.
        pos_weight: (E - 1,) positive weight per gate.
    """
    z = gate_logits[:, : targets.shape[1]]
    return F.binary_cross_entropy_with_logits(z.float(), targets, pos_weight=pos_weight.to(z.device),
                                              reduction="mean")


def exit_probabilities(gates: Tensor) -> Tensor:  # (b, E) -> (b, E)
    """P_l = max(0, min(g_l, 1 - sum_{k<l} g_k)), the last g taken as 1."""
    g = gates.clone()
    g[:, -1] = 1.0
    before = torch.cumsum(g, dim=1) - g  # sum_{k<l} g_k
    return torch.clamp(torch.minimum(g, 1.0 - before), min=0.0)


def im_loss(ce: Tensor, probs: Tensor, *, reweight_detach: bool = True) -> Tensor:
    """mean_b sum_l P_l CE_l * (sum_l CE_l / sum_l P_l CE_l).

    Args:
        ce: (E, b) cross-entropy of every exit.
        probs: (b, E) exit probabilities P (gates frozen: pass them detached).
        reweight_detach: treat the ratio as a constant (see the module docstring).
    """
    ce_t = ce.transpose(0, 1)  # (b, E)
    weighted = probs * ce_t  # (b, E)
    ratio = ce_t.sum(1) / weighted.sum(1).clamp_min(1e-12)  # (b,)
    if reweight_detach:
        ratio = ratio.detach()
    return (weighted.sum(1) * ratio).mean()


def exit_costs(model: "EarlyExitModel", seq_len: float | Tensor | None = None) -> Tensor:  # (E,)
    """c_l = FLOPs of a row leaving at exit l / FLOPs of one leaving at the last exit (c_E = 1).

    Uses the config's ``objective.costs`` when set; else the FLOPs counter at ``seq_len`` tokens;
    else (no counter for the backbone) layers run / layers of the last exit.
    """
    given = (model.config.objective or {}).get("costs")
    if given is not None:
        costs = torch.as_tensor(given, dtype=torch.float32)
        if costs.shape != (model.num_exits,):
            raise ValueError(f"objective.costs must have one value per exit ({model.num_exits}), got {given}")
        return costs / costs[-1]
    if seq_len is not None:
        try:
            per_exit = torch.as_tensor(model_exit_flops(model, float(seq_len)).per_exit, dtype=torch.float32)
            return per_exit / per_exit[-1]
        except ValueError:
            pass
    layers = torch.tensor(model.exit_layers, dtype=torch.float32)
    return layers / layers[-1]


def jei_loss(model: "EarlyExitModel", out: "EarlyExitOutput", labels: Tensor, **options: Any) -> Tensor:
    """The JEI loss of one batch for a generic training loop (``objective.phase`` picks the terms).

    ``warmup``: mean CE over exits; ``im``: the reweighted IM loss (gates detached); ``gate``: the
    gate BCE (targets from the detached CEs; positive weights from this batch); ``both``:
    IM + gate (each term reaches only its own modules). The phased schedule of JEI-DNN is
    ``offramp.training.jei.train_jei``.
    """
    opts = check_jei_options(options)
    ce = ce_per_exit(out.exit_logits, labels)  # (E, b)
    if opts["phase"] == "warmup":
        return ce.mean()
    if out.gate_logits is None:
        raise ValueError("objective 'jei' needs exit gates: build the model with gate={'type': 'uncertainty'}")
    loss = ce.new_zeros(())
    if opts["phase"] in ("im", "both"):
        probs = exit_probabilities(torch.sigmoid(out.gate_logits.detach().float()))
        loss = loss + im_loss(ce, probs, reweight_detach=opts["reweight_detach"])
    if opts["phase"] in ("gate", "both") and model.num_exits > 1:
        costs = exit_costs(model)
        targets, _ = gate_targets(ce, costs, opts["cost_weight"])
        weights = gate_pos_weights(targets, opts["pos_weight_clip"], opts["pos_weight"])
        loss = loss + gate_loss(out.gate_logits, targets, weights)
    return loss
