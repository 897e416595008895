"""The LYNX exit rule as an exit policy: exit at a cue event whose conformal set is exactly {1}.

The "exits" of a chain of thought are its cue events: ``index`` is the event number and
``signals.hidden`` holds the (b, d) cue features (concatenated hidden states). The policy is
stateless; the reasoning engine (``offramp.engines.reason.reason``) and the offline replay over
stored events (``offramp.evaluation.events.replay_events``) call the same ``decide``. It is built
from a fitted probe, so it is not in ``POLICIES``: ``offramp.calibration.lynx.probe_policy(path)``
loads one from its folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, PolicyState


@dataclass(frozen=True)
class ProbeExitPolicy(ExitPolicy):
    """Exit where a calibrated probe (``offramp.calibration.lynx.LynxProbe``) accepts; ``path`` is the
    folder it was loaded from, kept for ``to_dict``."""

    type: ClassVar[str] = "probe"
    needs: ClassVar[tuple[str, ...]] = ("hidden",)
    path: str = ""
    probe: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.probe is None:
            raise ValueError("probe policy needs a calibrated probe: pass probe=, or load one from its folder "
                             "with offramp.calibration.lynx.probe_policy(path)")
        if not hasattr(self.probe, "conformal_"):
            raise ValueError("the probe is not calibrated: call LynxProbe.calibrate(features, labels, delta)")

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        if signals.hidden is None:
            raise ValueError("probe policy reads ExitSignals.hidden (the (b, d) cue features); it is None")
        feats = signals.hidden.detach().float().cpu().numpy()  # (b, d)
        return torch.from_numpy(self.probe.accepts(feats)).to(signals.hidden.device), state

    def explain(self, index: int, signals: ExitSignals) -> dict:
        feats = signals.hidden.detach().float().cpu().numpy()
        return {"p1": float(self.probe.predict_proba(feats)[0, 1])}  # the probe's P(right) at this event

    def to_dict(self) -> dict:
        return {"type": self.type, "path": self.path}
