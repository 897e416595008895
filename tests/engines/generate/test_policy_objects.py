"""The token-exit rule: the confidence threshold as a registered ExitPolicy."""

from __future__ import annotations

import pytest
import torch

from offramp.policies.base import ExitSignals
from offramp.policies.token_confidence import TokenConfidencePolicy


def test_threshold_decides_per_row_and_min_exit_holds_back() -> None:
    gate = torch.tensor([0.95, 0.5, 0.9, 0.1])
    signals = ExitSignals(confidence=gate)
    policy = TokenConfidencePolicy(threshold=0.9)
    state = policy.start(4, 3)
    exit_now, _ = policy.decide(1, signals, state)
    assert exit_now.tolist() == [True, False, True, False]
    held, _ = TokenConfidencePolicy(threshold=0.9, min_exit=2).decide(1, signals, state)
    assert not held.any()
    assert policy.with_threshold(0.4).decide(0, signals, state)[0].tolist() == [True, True, True, False]


def test_bad_thresholds_and_missing_gate() -> None:
    with pytest.raises(ValueError, match="threshold"):
        TokenConfidencePolicy(threshold=1.2)
    with pytest.raises(ValueError, match="min_exit"):
        TokenConfidencePolicy(min_exit=-1)
    with pytest.raises(ValueError, match="confidence"):
        TokenConfidencePolicy().decide(0, ExitSignals(logits=torch.zeros(2, 1)), TokenConfidencePolicy().start(2, 1))
