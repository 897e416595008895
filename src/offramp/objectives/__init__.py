"""Training objectives: joint (uniform / PABEE weights, self-distillation), ponder, jei."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from offramp.objectives.jei import jei_loss
from offramp.objectives.joint import joint_loss, per_exit_loss, self_distillation
from offramp.objectives.ponder import ponder_loss

if TYPE_CHECKING:
    from offramp.modeling import EarlyExitModel, EarlyExitOutput


def compute_loss(model: "EarlyExitModel", out: "EarlyExitOutput", labels: Tensor) -> Tensor:
    """The loss named by ``model.config.objective`` for one batch's outputs."""
    obj = dict(model.config.objective)
    kind = obj.pop("type")
    if kind == "joint":
        return joint_loss(out.exit_logits, labels, obj["weights"], obj["distill"], obj["temperature"],
                          obj["converge"], out.pooled)
    if kind == "ponder":
        return ponder_loss(out.exit_logits, out.halting_logits, labels, **obj)
    if kind == "jei":
        return jei_loss(model, out, labels, **obj)
    raise ValueError(f"unknown objective {kind!r}")


__all__ = ["compute_loss", "joint_loss", "per_exit_loss", "ponder_loss", "self_distillation"]
