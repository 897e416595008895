"""The joint objective's terms: self-distillation towards the last exit, and the LEAP-style
convergence of the exits' pooled states towards the last layer's."""

from __future__ import annotations

import torch

from offramp.objectives.joint import convergence, joint_loss


def test_convergence_is_zero_when_every_exit_already_says_what_the_last_says():
    last = torch.randn(4, 8)
    same = torch.stack([last * 2.0, last * 0.5, last])  # the same directions (cosine 1)
    assert convergence(same).abs() < 1e-6
    other = torch.stack([torch.randn(4, 8), torch.randn(4, 8), last])
    assert convergence(other) > 0.3


def test_convergence_moves_the_early_exits_and_never_the_last():
    pooled = torch.randn(3, 5, 8, requires_grad=True)
    convergence(pooled).backward()
    assert pooled.grad[:2].abs().sum() > 0
    assert pooled.grad[2].abs().sum() == 0  # the target is detached: the last layer is not pulled back


def test_joint_loss_adds_the_convergence_term_only_when_asked():
    logits, labels = torch.randn(3, 5, 4), torch.randint(0, 4, (5,))
    pooled = torch.randn(3, 5, 8)
    base = joint_loss(logits, labels)
    assert torch.equal(joint_loss(logits, labels, converge=0.0, pooled=pooled), base)
    assert joint_loss(logits, labels, converge=2.0, pooled=pooled) == base + 2.0 * convergence(pooled)
