"""Halting that learns: input-dependent lambda on a task whose difficulty is known per input, the
degenerate-halting warning, and PonderNet sampling keyed on the row (not on its batch)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from encoders import make_batch
from transformers import BertConfig, BertModel

from offramp import EarlyExitModel, OfframpConfig
from offramp.evaluation.collect import collect, replay
from offramp.evaluation.halting import halting_report
from offramp.objectives.ponder import ponder_loss
from offramp.policies.base import keyed_uniform, row_keys
from offramp.training import TrainingArgs, train

E, D = 4, 32


def _difficulty_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled states (E, n, D): easy rows carry the class at every exit, hard rows only at the last."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    easy = torch.rand(n, generator=g) < 0.5
    direction = torch.randn(D, generator=torch.Generator().manual_seed(123))
    direction /= direction.norm()
    x = torch.randn(E, n, D, generator=g) * 0.5
    sign = (2 * y - 1).float()
    for i in range(E):
        strength = torch.where(easy | torch.tensor(i == E - 1), 2.0, 0.0)
        x[i] += (strength * sign)[:, None] * direction
    return x, y, easy


def _train_halting(tmp_path, objective: dict, epochs: int = 12) -> tuple[EarlyExitModel, list[str]]:
    torch.manual_seed(0)
    backbone = BertModel(BertConfig(vocab_size=50, hidden_size=D, num_hidden_layers=E, num_attention_heads=4,
                                    intermediate_size=64))
    model = EarlyExitModel(backbone, OfframpConfig(num_labels=2, halting={"type": "palbert"},
                                                   objective={"type": "ponder", **objective}))
    x, y, _ = _difficulty_task(1024, seed=0)
    xv, yv, _ = _difficulty_task(256, seed=2)
    batches = [{"pooled": x[:, i:i + 64].transpose(0, 1), "labels": y[i:i + 64]} for i in range(0, 1024, 64)]
    val = [{"pooled": xv[:, i:i + 64].transpose(0, 1), "labels": yv[i:i + 64]} for i in range(0, 256, 64)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, batches, val, TrainingArgs(output_dir=str(tmp_path), epochs=epochs, lr=1e-2, progress=False,
                                                save_backbone=False))
    return model.eval(), [str(w.message) for w in caught]


def _q_exit_layers(model: EarlyExitModel, x: torch.Tensor, q: float) -> torch.Tensor:
    with torch.no_grad():
        p = model(pooled=x).halting_probs
    return (p.cumsum(1) > q).float().argmax(1) + 1.0


def test_default_recipe_learns_input_dependent_halting(tmp_path):
    model, messages = _train_halting(tmp_path, {})
    x, _, easy = _difficulty_task(1024, seed=1)
    layers = _q_exit_layers(model, x, 0.25)
    # easy rows are solvable at exit 1, hard ones only at the last: the easy ones leave earlier
    assert layers[~easy].mean() - layers[easy].mean() >= 1.0, (layers[easy].mean(), layers[~easy].mean())
    with torch.no_grad():
        lam = torch.sigmoid(model(pooled=x).halting_logits)
    assert lam[easy, :-1].mean() > 10 * lam[~easy, :-1].mean()
    assert not halting_report(lam).degenerate
    assert not any("degenerate" in m for m in messages), messages


def test_per_row_kl_with_a_huge_beta_is_degenerate_and_warned(tmp_path):
    model, messages = _train_halting(tmp_path, {"kl_target": "row", "beta": 50.0}, epochs=6)
    x, _, easy = _difficulty_task(512, seed=1)
    layers = _q_exit_layers(model, x, 0.25)
    assert layers[easy].mean() == layers[~easy].mean()  # every row follows the prior
    assert any("halting layer is degenerate" in m and "kl_target='batch'" in m for m in messages), messages
    with torch.no_grad():
        report = halting_report(torch.sigmoid(model(pooled=x).halting_logits))
    assert report.degenerate and report.lambda_spread < 0.03


def test_halting_report_reads_spread_and_distance_to_the_prior():
    same = torch.full((100, 4), 0.1)
    r = halting_report(same, 0.1)
    assert r.degenerate and r.lambda_spread == 0 and r.row_kl_to_prior < 1e-6
    assert "hardly varies" in r.reason and "within KL" in r.reason
    spread = torch.cat([torch.full((50, 4), 0.9), torch.full((50, 4), 0.01)])
    r = halting_report(spread, 0.1)
    assert not r.degenerate and r.lambda_spread > 0.4
    assert abs(sum(r.exit_distribution) - 1) < 1e-3
    with pytest.raises(ValueError, match="shape"):
        halting_report(torch.zeros(4))


def test_batch_kl_pulls_the_mean_not_each_row():
    """Two rows with opposite exit distributions whose mean is the prior: no KL under "batch"."""
    # lambda_1 = 1 - eps for row 0 (exits at 1), eps for row 1 (exits at 2): mean (0.5, 0.5)
    logits = torch.tensor([[8.0, 0.0], [-8.0, 0.0]])
    exit_logits = torch.zeros(2, 2, 3)  # equal CE everywhere: the task term is constant
    labels = torch.tensor([0, 1])
    task = ponder_loss(exit_logits, logits, labels, beta=0.0, lambda_p=0.5)
    batch = ponder_loss(exit_logits, logits, labels, beta=1.0, lambda_p=0.5, kl_target="batch") - task
    row = ponder_loss(exit_logits, logits, labels, beta=1.0, lambda_p=0.5, kl_target="row") - task
    assert abs(float(batch)) < 1e-3 and float(row) > 1.0
    with pytest.raises(ValueError, match="kl_target"):
        ponder_loss(exit_logits, logits, labels, kl_target="rows")
    with pytest.raises(ValueError, match="kl_target"):
        OfframpConfig(num_labels=2, halting={"type": "palbert"}, objective={"type": "ponder", "kl_target": "x"})


# ------------------------------------------------------------------------------ ponder_sample
def test_row_keys_ignore_padding_batch_and_position():
    ids, mask = make_batch(8, 10, seed=3)
    keys = row_keys(ids, mask)
    assert keys.dtype == torch.int64 and len(set(keys.tolist())) == 8 and bool((keys >= 0).all())
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    assert row_keys(ids[perm], mask[perm]).tolist() == keys[perm].tolist()
    lengths = mask.sum(1)
    left_ids, left_mask = torch.ones_like(ids), torch.zeros_like(mask)  # the same rows, left-padded, wider
    wide_ids, wide_mask = torch.ones(8, 14, dtype=ids.dtype), torch.zeros(8, 14, dtype=mask.dtype)
    for r in range(8):
        n = int(lengths[r])
        left_ids[r, -n:], left_mask[r, -n:] = ids[r, :n], 1
        wide_ids[r, :n], wide_mask[r, :n] = ids[r, :n], 1
    assert row_keys(left_ids, left_mask).tolist() == keys.tolist()
    assert row_keys(wide_ids, wide_mask).tolist() == keys.tolist()
    changed = ids.clone()
    changed[0, 0] += 1
    assert row_keys(changed, mask)[0] != keys[0]
    u = keyed_uniform(keys, 0, 1)
    assert bool(((u >= 0) & (u < 1)).all()) and not torch.equal(u, keyed_uniform(keys, 1, 1))
    assert not torch.equal(u, keyed_uniform(keys, 0, 2))


@pytest.fixture(scope="module")
def halting_model(tiny_bert):
    torch.manual_seed(4)
    model = EarlyExitModel.from_backbone(tiny_bert, OfframpConfig(num_labels=3, halting={"type": "pondernet"},
                                                                  objective={"type": "ponder"})).eval()
    with torch.no_grad():  # lambda near 0.5 with some spread: rows exit at different exits
        model.halting.mlp[-1].bias.fill_(0.0)
    return model


def test_ponder_sample_does_not_depend_on_the_batch(halting_model):
    ids, mask = make_batch(24, 10, seed=11)
    spec = {"type": "ponder_sample", "seed": 5}
    whole = halting_model.predict(ids, mask, spec).exit_index
    assert len(set(whole.tolist())) >= 2
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    shuffled = halting_model.predict(ids[perm], mask[perm], spec).exit_index
    assert shuffled.tolist() == whole[perm].tolist()
    alone = torch.cat([halting_model.predict(ids[i:i + 1], mask[i:i + 1], spec).exit_index for i in range(24)])
    assert alone.tolist() == whole.tolist()
    other_seed = halting_model.predict(ids, mask, {"type": "ponder_sample", "seed": 6}).exit_index
    assert other_seed.tolist() != whole.tolist()


def test_ponder_sample_sweep_equals_evaluate(halting_model):
    """A trace collected in batches of 5 and replayed whole takes the exits predict takes in batches of 8."""
    ids, mask = make_batch(40, 10, seed=12)
    labels = torch.zeros(40, dtype=torch.long)
    batches = [{"input_ids": ids[i:i + 5], "attention_mask": mask[i:i + 5], "labels": labels[i:i + 5]}
               for i in range(0, 40, 5)]
    trace = collect(halting_model, batches)
    assert trace.row_key is not None and trace.row_key.tolist() == row_keys(ids, mask).tolist()
    spec = {"type": "ponder_sample", "seed": 2}
    replayed, _ = replay(spec, trace)
    online = torch.cat([halting_model.predict(ids[i:i + 8], mask[i:i + 8], spec).exit_index for i in range(0, 40, 8)])
    assert replayed.tolist() == online.tolist()
    sub = trace.subset([3, 17, 30])
    assert replay(spec, sub)[0].tolist() == [online[3].item(), online[17].item(), online[30].item()]
    no_keys = trace.subset(range(40))
    no_keys.row_key = None
    with pytest.raises(ValueError, match="row_key"):
        replay(spec, no_keys)


def test_cli_kl_target_is_stored_and_the_trace_records_the_halting(tmp_path, capsys):
    from commands import cli
    from tiny_assets import write_csv, write_model

    model, csv = write_model(tmp_path / "tiny"), write_csv(tmp_path / "d.csv", n=120)
    assert cli("train", "--model", model, "--data", csv, "--out", tmp_path / "run", "--halting", "pondernet",
               "--kl-target", "row", "--epochs", "1", "--batch-size", "16") == 0
    cfg = EarlyExitModel.from_pretrained(tmp_path / "run" / "checkpoint").config
    assert cfg.objective["kl_target"] == "row"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "lambda_spread" in metrics[-1]["halting"]
    assert cli("collect", "--model", tmp_path / "run", "--out", tmp_path / "trace") == 0
    from offramp.evaluation.collect import ExitTrace

    trace = ExitTrace.load(tmp_path / "trace")
    assert trace.row_key is not None and trace.meta["halting"]["lambda_p"] == 0.1
    assert cli("sweep", "--trace", tmp_path / "trace", "--out", tmp_path / "rep", "--rules",
               "ponder_sample,q_exit") == 0
    assert "ponder_sample" in (tmp_path / "rep" / "report.md").read_text()


def test_row_target_equals_the_per_row_loss_written_as_a_loop():
    """kl_target="row" with epsilon truncation is PALBERT's training loss: a loop over the exits
    (pdf_i = lambda_i * survival, replaced by eps / E once the CDF passed 1 - eps), the task loss
    sum_i mean_b(pdf_i CE_i) and KL(p_G || pdf) summed over exits, averaged over rows."""
    g = torch.Generator().manual_seed(0)
    b, e, c, eps, lam_p, beta = 16, 12, 3, 0.05, 0.1, 0.5
    z = torch.randn(b, e, generator=g) * 2 - 1
    logits = torch.randn(e, b, c, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    cdf, survive, pdfs = torch.zeros(b), torch.ones(b), []
    for i in range(e):
        lam = torch.sigmoid(z[:, i])
        pdf = torch.where(cdf > 1 - eps, torch.full((b,), eps / e), lam * survive)
        survive = survive * (1 - lam)
        cdf = cdf + pdf
        pdfs.append(pdf)
    pdf = torch.stack(pdfs, 1)
    prior = torch.tensor([lam_p * (1 - lam_p) ** k for k in range(e - 1)])
    prior = torch.cat([prior, 1 - prior.sum(0, keepdim=True)])
    task = sum((pdf[:, i] * torch.nn.functional.cross_entropy(logits[i], y, reduction="none")).mean()
               for i in range(e))
    kl = (prior[None] * (prior[None].log() - pdf.log())).sum(1).mean()
    ours = ponder_loss(logits, z, y, beta=beta, lambda_p=lam_p, truncation="epsilon", epsilon=eps, kl_target="row")
    torch.testing.assert_close(ours, task + beta * kl, atol=1e-5, rtol=1e-5)
