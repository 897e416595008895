"""Training exits on a frozen decoder: KD loss, top-k-relaxed targets, decaying weights."""

from __future__ import annotations

import torch
from decoder_models import tiny_decoder

from offramp.modeling import DecoderExitModel, default_exit_layers
from offramp.training.distill import (
    collect_states,
    distill_loss,
    exit_targets,
    exit_weights,
    fit_exits,
    train_exit_heads,
)


class _Tok:
    """A whitespace tokenizer over digits: enough for greedy_continuations in tests."""

    padding_side = "right"

    def __call__(self, texts, return_tensors="pt", padding=True):
        rows = [[4 + int(w) % 90 for w in t.split()] for t in texts]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        return {"input_ids": ids, "attention_mask": mask}


def test_weights_decay_linearly_and_sum_to_one() -> None:
    w = exit_weights(4)
    assert torch.allclose(w, torch.tensor([4.0, 3.0, 2.0, 1.0]) / 10)


def test_distill_loss_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    t = torch.randn(5, 7)
    assert distill_loss(t, t).abs() < 1e-6
    assert distill_loss(torch.randn(5, 7), t) > 0


def test_default_exit_layers_sit_in_the_second_half() -> None:
    assert default_exit_layers(30) == [15, 18, 21, 24, 27]
    assert default_exit_layers(4) == [2, 3]


def test_heads_learn_and_targets_follow_top_k() -> None:
    from offramp.training.distill import greedy_continuations

    backbone = tiny_decoder("llama", layers=4)
    model = DecoderExitModel.from_backbone(backbone, exit_layers=[2, 3], head="ffn")
    prompts = [" ".join(str(i * 7 + j) for j in range(6)) for i in range(8)]
    seqs = greedy_continuations(backbone, _Tok(), prompts, max_new_tokens=8, batch_size=4)
    assert len(seqs) == 8 and all(7 <= ids.numel() <= 6 + 8 and first == 6 for ids, first in seqs)
    states = collect_states(model, seqs, kd_top_k=16)
    before = [p.clone() for p in model.heads.parameters()]
    hist = train_exit_heads(model, states, epochs=6, lr=1e-2, batch_size=4, log=None)
    assert hist[-1] < hist[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.heads.parameters()))
    assert all(p.grad is None for p in backbone.parameters())
    _, t1 = exit_targets(model, states, top_k=1)
    _, t5 = exit_targets(model, states, top_k=5)
    assert t1.shape == (sum(ids.numel() - 6 for ids, _ in seqs), 2) and (t5 >= t1).all() and t5.sum() > t1.sum()


def test_fit_exits_runs_end_to_end_with_a_mamba_head() -> None:
    backbone = tiny_decoder("mamba", layers=4)
    model = DecoderExitModel.from_backbone(backbone, exit_layers=[2, 3], head="mamba", top_k=2)
    seqs = [(torch.randint(4, 97, (12,)), 6) for _ in range(4)]
    report = fit_exits(model, seqs, head_epochs=2, confidence_epochs=3, log=None)
    assert report["positions"] == 4 * 6 and len(report["exit_ok_rate"]) == 2
    assert model.config.top_k == 2


def test_exit_features_read_the_hidden_state_after_k_layers() -> None:
    for family in ("llama", "gpt2", "gemma3", "mamba", "mamba2"):
        backbone = tiny_decoder(family, layers=4)
        model = DecoderExitModel.from_backbone(backbone, exit_layers=[2, 3], head="tied")
        seen = {}
        handles = [backbone_layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
                   for i, backbone_layer in enumerate(model.adapter.layers())]
        out = model(torch.tensor([[5, 6, 7, 8]]))
        for h in handles:
            h.remove()
        assert torch.equal(out.exit_features[0], seen[1]) and torch.equal(out.exit_features[1], seen[2]), family


def test_text_sequences_distil_every_position_after_the_first() -> None:
    from offramp.training.distill import text_sequences

    class Tok:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1] + [4 + int(w) for w in text.split()]}

    seqs = text_sequences(Tok(), ["1 2 3 4 5 6", "7", "8 9"], max_tokens=4)
    assert [s[0].tolist() for s in seqs] == [[1, 5, 6, 7], [1, 11], [1, 12, 13]]
    assert all(first == 1 for _, first in seqs)
    model = DecoderExitModel.from_backbone(tiny_decoder("llama", layers=4), exit_layers=[2, 3], head="tied")
    states = collect_states(model, seqs, kd_top_k=8)
    assert [int(s.train.sum()) for s in states] == [3, 1, 2]  # every next-token prediction inside the text
    import pytest

    with pytest.raises(ValueError, match="empty"):
        text_sequences(Tok(), [])
    with pytest.raises(ValueError, match="max_tokens"):
        text_sequences(Tok(), ["1 2"], max_tokens=1)
