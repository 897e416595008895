"""Safe defaults of token-exit generation: a probe that falls back to plain decoding when exits or
self-speculation do not pay, a folder whose default rule is never until calibrated, and fitting on
too little data warned about with the numbers."""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch
from commands import cli
from decoder_models import ragged_prompts, tiny_decoder, tiny_lm_folder

from offramp.engines.generate import generate
from offramp.engines.generate.guard import probe_decoding, unpadded_rows
from offramp.modeling import DecoderExitModel
from offramp.training.distill import MIN_FIT_POSITIONS, warn_thin_fit

PROMPTS = ["--prompt", "w5 w6 w7", "--prompt", "w9 w40 w41", "--max-new-tokens", "8"]


def _scrambled(folder, model, tmp_path):
    """Exits whose (untrained FFN) heads disagree with the last layer, saved; and plain output."""
    DecoderExitModel.from_backbone(model, exit_layers=[1, 2]).save_pretrained(tmp_path / "exits")
    plain = tmp_path / "plain.json"
    assert cli("generate", "--model", folder, *PROMPTS, "--json", plain) == 0
    return tmp_path / "exits", [r["tokens"] for r in json.loads(plain.read_text())["rows"]]


def test_a_rule_that_exits_on_garbage_falls_back_to_plain_decoding(tmp_path, capsys) -> None:
    folder, model = tiny_lm_folder(tmp_path)
    exits, plain = _scrambled(folder, model, tmp_path)
    out = tmp_path / "out.json"
    capsys.readouterr()
    assert cli("generate", "--model", folder, "--exits", exits, "--policy", "static", "--value", "1", *PROMPTS,
               "--json", out) == 0
    err = capsys.readouterr().err
    assert "probe of early exits" in err and "Decoding plainly" in err and "--no-fallback" in err
    result = json.loads(out.read_text())
    assert result["probe"]["fallback"] and result["probe"]["agreement"] < 0.75
    assert [r["tokens"] for r in result["rows"]] == plain  # plain decoding's output
    assert all(set(r["exit_layers"]) == {4} for r in result["rows"])
    # --no-fallback decodes as asked: every token after the first leaves at layer 1
    assert cli("generate", "--model", folder, "--exits", exits, "--policy", "static", "--value", "1", *PROMPTS,
               "--json", out, "--no-fallback") == 0
    result = json.loads(out.read_text())
    assert "probe" not in result and set(result["rows"][0]["exit_layers"][1:]) == {1}


def test_exits_without_a_calibrated_rule_decode_with_every_layer(tmp_path, capsys) -> None:
    folder, model = tiny_lm_folder(tmp_path)
    exits, plain = _scrambled(folder, model, tmp_path)
    assert DecoderExitModel.from_pretrained(exits, backbone=model).config.policy == {"type": "never"}
    out = tmp_path / "out.json"
    assert cli("generate", "--model", folder, "--exits", exits, *PROMPTS, "--json", out) == 0
    assert "no calibrated rule" in capsys.readouterr().err
    assert [r["tokens"] for r in json.loads(out.read_text())["rows"]] == plain


def test_probe_falls_back_when_the_mode_is_slower_and_keeps_a_mode_that_pays() -> None:
    lm = tiny_decoder("llama", layers=4)
    ids, mask = ragged_prompts(2)
    rows = unpadded_rows(ids, mask, 2)
    assert [len(r) for r in rows] == mask.sum(1).tolist()

    def slow(i, n):  # plain decoding's output, after a pause far longer than the decoding itself
        time.sleep(0.2)
        return generate(lm, i, max_new_tokens=n)

    probe = probe_decoding(lm, rows, slow, mode="slow", lossy=True, tokens=6)
    assert probe.fallback and "slower than plain decoding" in probe.reason and probe.agreement == 1.0
    assert probe.speedup < 0.5
    exits = DecoderExitModel.from_backbone(lm, exit_layers=[3], head="tied")
    same = probe_decoding(lm, rows, lambda i, n: exits.generate(i, policy="never", max_new_tokens=n), mode="never",
                          lossy=True, tokens=6, margin=0.9)
    assert not same.fallback and same.agreement == 1.0 and same.reason == "it pays"
    with pytest.raises(ValueError, match="at least one prompt"):
        probe_decoding(lm, [], slow, mode="x", lossy=False)


def test_speculation_that_does_not_pay_tries_ngram_drafts_then_plain_decoding(tmp_path, capsys, monkeypatch) -> None:
    from offramp.engines.generate import speculative

    folder, model = tiny_lm_folder(tmp_path)
    DecoderExitModel.from_backbone(model, exit_layers=[2], head="tied").save_pretrained(tmp_path / "exits")
    plain = tmp_path / "plain.json"
    assert cli("generate", "--model", folder, *PROMPTS, "--json", plain) == 0
    real, tried = speculative.speculative_generate, []

    def exit_drafts_slow(*a, draft_tokens=3, **kw):  # exit drafts: far slower than plain decoding
        tried.append(draft_tokens)
        if draft_tokens:
            time.sleep(0.2)
        return real(*a, draft_tokens=draft_tokens, **kw)

    monkeypatch.setattr(speculative, "speculative_generate", exit_drafts_slow)
    out = tmp_path / "out.json"
    capsys.readouterr()
    assert cli("generate", "--model", folder, "--exits", tmp_path / "exits", "--speculative", "--ngram", "4",
               *PROMPTS, "--json", out) == 0
    err = capsys.readouterr().err
    assert "probe of self-speculation" in err and "Trying n-gram drafts only (prompt lookup) next" in err
    result = json.loads(out.read_text())
    assert 3 in tried and 0 in tried  # both modes were probed, exit drafts first
    assert result["probe"]["mode"] == "n-gram drafts only (prompt lookup)"
    # whichever the second probe picked (n-gram drafts or plain decoding), the output is plain decoding's
    assert [r["tokens"] for r in result["rows"]] == [r["tokens"] for r in json.loads(plain.read_text())["rows"]]
    # without --ngram there is no second mode: straight to plain decoding
    tried.clear()
    assert cli("generate", "--model", folder, "--exits", tmp_path / "exits", "--speculative", "--ngram", "0",
               *PROMPTS, "--json", out) == 0
    assert "Decoding plainly" in capsys.readouterr().err and 0 not in tried
    # --draft-tokens 0: n-gram drafts only, probed as such, the exit never drafts
    tried.clear()
    assert cli("generate", "--model", folder, "--exits", tmp_path / "exits", "--speculative", "--ngram", "4",
               "--draft-tokens", "0", *PROMPTS, "--json", out) == 0
    result = json.loads(out.read_text())
    assert result["probe"]["mode"] == "n-gram drafts only (prompt lookup)" and set(tried) == {0}
    assert [r["tokens"] for r in result["rows"]] == [r["tokens"] for r in json.loads(plain.read_text())["rows"]]


def test_fitting_on_too_little_data_warns_with_the_numbers(tmp_path, capsys) -> None:
    with pytest.warns(UserWarning, match=f"fitted on 320 token positions \\(8 texts\\); below {MIN_FIT_POSITIONS}"):
        said = warn_thin_fit(8, 320, [15, 24], [0.06, 0.27])
    assert len(said) == 2 and "best exit (layer 24) agrees with the last layer on 27%" in said[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_thin_fit(64, 11_000, [15, 24], [0.4, 0.8]) == []
    folder, _ = tiny_lm_folder(tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(" ".join(f"w{4 + (i * 7 + j) % 90}" for j in range(20)) for i in range(4)))
    assert cli("fit-exits", "--model", folder, "--out", tmp_path / "exits", "--fit-text", text,
               "--exit-layers", "2,3", "--fit-epochs", "1") == 0
    assert "offramp fit-exits: warning: the exits were fitted on" in capsys.readouterr().err
    fit = DecoderExitModel.from_pretrained(tmp_path / "exits").config.extra["fit"]
    assert fit["sequences"] == 4 and 0 < fit["positions"] < MIN_FIT_POSITIONS and len(fit["exit_agreement"]) == 2
    assert torch.tensor(fit["exit_agreement"]).le(1).all()
