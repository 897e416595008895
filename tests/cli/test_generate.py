"""``offramp generate`` on a tiny saved model: texts, exit layers, JSON, bad input."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from decoder_models import tiny_lm_folder

from offramp.cli.fit_exits import add_fit_exits_parser
from offramp.cli.generate import add_generate_parser
from offramp.modeling import DecoderExitModel


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_generate_parser(sub)
    add_fit_exits_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_generate_never_exit_then_with_exits(tmp_path, capsys) -> None:
    folder, model = tiny_lm_folder(tmp_path)
    out = tmp_path / "out.json"
    assert _run(["generate", "--model", str(folder), "--prompt", "w5 w6 w7", "--prompt", "w9",
                 "--max-new-tokens", "5", "--json", str(out), "--show-exits"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(set(r["exit_layers"]) == {4} for r in rows)
    ref = model.generate(torch.tensor([[5, 6, 7]]), do_sample=False, max_new_tokens=5, pad_token_id=0,
                         eos_token_id=3)[0, 3:]
    assert rows[0]["tokens"] == ref.tolist()[:len(rows[0]["tokens"])]
    exits = DecoderExitModel.from_backbone(model, exit_layers=[2, 3])
    exits.save_pretrained(tmp_path / "exits")
    assert _run(["generate", "--no-fallback", "--model", str(folder), "--exits", str(tmp_path / "exits"), "--policy",
                 "token_confidence", "--value", "0", "--prompt", "w5 w6 w7", "--max-new-tokens", "5", "--json", str(out)]) == 0
    layers = json.loads(out.read_text())["rows"][0]["exit_layers"]
    assert layers[0] == 4 and set(layers[1:]) <= {2}
    assert _run(["generate", "--no-fallback", "--model", str(folder), "--exits", str(tmp_path / "exits"), "--policy", "static",
                 "--value", "3", "--prompt", "w5 w6 w7", "--max-new-tokens", "5", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["policy"] == {"type": "static", "layer": 3} and set(written["rows"][0]["exit_layers"][1:]) == {3}
    assert "mean exit layer" in capsys.readouterr().out


def test_generate_stream_writes_the_tokens_of_generate_line_by_line(tmp_path, capsys) -> None:
    folder, model = tiny_lm_folder(tmp_path)
    DecoderExitModel.from_backbone(model, exit_layers=[2, 3]).save_pretrained(tmp_path / "exits")
    common = ["generate", "--no-fallback", "--model", str(folder), "--exits", str(tmp_path / "exits"), "--policy",
              "token_confidence", "--value", "0.02",
              "--prompt", "w5 w6 w7", "--prompt", "w9", "--prompt", "w11 w12", "--max-new-tokens", "6",
              "--batch-size", "2"]
    assert _run(common + ["--json", str(tmp_path / "plain.json")]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())["rows"]
    capsys.readouterr()
    assert _run(common + ["--stream", "--json", str(tmp_path / "streamed.json")]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert "tokens/s" in captured.err and "###" not in captured.out  # stdout holds only the JSON lines
    assert json.loads((tmp_path / "streamed.json").read_text())["rows"] == plain
    for k, row in enumerate(plain):
        tokens = [x for x in lines if x["index"] == k and "done" not in x]
        done = [x for x in lines if x["index"] == k and "done" in x]
        assert [x["token"] for x in tokens] == row["tokens"] and [x["exit_layer"] for x in tokens] == row["exit_layers"]
        assert "".join(x["text"] for x in tokens) == row["text"]
        assert done == [{"index": k, "done": True, "text": row["text"], "tokens": row["tokens"],
                         "exit_layers": row["exit_layers"]}]
        assert lines.index(done[0]) > max(lines.index(x) for x in tokens)  # a prompt's end follows its tokens
    assert len({x["exit_layer"] for x in lines if "token" in x}) > 1  # the exits did something
    with pytest.raises(ValueError, match="drop --speculative"):
        _run(common + ["--stream", "--speculative"])


def test_generate_bad_input(tmp_path) -> None:
    folder, _ = tiny_lm_folder(tmp_path)
    with pytest.raises(ValueError, match="need exits"):
        _run(["generate", "--model", str(folder), "--prompt", "w5", "--threshold", "0.5"])
    with pytest.raises(ValueError, match="not both"):
        _run(["generate", "--no-fallback", "--model", str(folder), "--exits", "x", "--prompt", "w5", "--threshold", "0.5",
              "--policy", "max_prob"])
    with pytest.raises(ValueError, match="needs halting, which token-exit generation does not supply"):
        _run(["generate", "--model", str(tmp_path / "not-loaded"), "--exits", "x", "--prompt", "w5",
              "--policy", "q_exit"])
    with pytest.raises(ValueError, match="no prompt"):
        _run(["generate", "--model", str(folder)])
    with pytest.raises(ValueError, match="cannot load the model"):
        _run(["generate", "--model", str(tmp_path / "missing"), "--prompt", "w5"])


def test_offline_smollm2_without_gguf_names_the_install(monkeypatch, tmp_path):
    import importlib.util

    import offramp.data.assets as assets

    real = importlib.util.find_spec
    monkeypatch.setenv("OFFRAMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ValueError, match=r"offramp\[gguf\]"):
        assets.smollm2_dir()


def test_fit_exits_on_a_text_file_trains_saves_and_uses_them(tmp_path, capsys) -> None:
    folder, model = tiny_lm_folder(tmp_path)
    text = tmp_path / "corpus.txt"
    docs = [" ".join(f"w{4 + (i * 7 + j) % 90}" for j in range(20)) for i in range(6)]
    text.write_text("\n\n".join(docs) + "\n\n\n")
    out = tmp_path / "exits"
    assert _run(["fit-exits", "--model", str(folder), "--out", str(out), "--fit-text", str(text),
                 "--exit-layers", "2,3", "--fit-epochs", "2", "--fit-max-tokens", "12"]) == 0
    printed = capsys.readouterr()
    assert "heads epoch 2/2" in printed.err and f"saved to {out}" in printed.err  # progress on stderr
    assert "heads epoch" not in printed.out  # stdout carries results only
    assert json.loads(printed.out)["exit_layers"] == [2, 3]
    assert _run(["generate", "--no-fallback", "--model", str(folder), "--exits", str(out), "--policy", "token_confidence", "--value",
                 "0", "--prompt", "w5 w6 w7", "--max-new-tokens", "4", "--json", str(tmp_path / "o.json")]) == 0
    loaded = DecoderExitModel.from_pretrained(out, backbone=model)
    assert loaded.exit_layers == [2, 3]
    trained = torch.cat([p.flatten() for p in loaded.heads.parameters()])
    assert trained.abs().sum() > 0  # the FFN heads start at zero: distillation moved them
    layers = json.loads((tmp_path / "o.json").read_text())["rows"][0]["exit_layers"]
    assert set(layers[1:]) <= {2}
    # the fitted text's tokens, most frequent first, for --draft-vocab
    counts = {}
    for doc in docs:
        for w in doc.split()[1:12]:  # text_sequences keep 12 tokens; the first is not a training target
            counts[int(w[1:])] = counts.get(int(w[1:]), 0) + 1
    vocab = loaded.config.draft_vocab
    assert sorted(vocab) == sorted(counts) and [counts[t] for t in vocab] == sorted(counts.values(), reverse=True)
    spec, plain = tmp_path / "spec.json", tmp_path / "plain.json"
    prompts = ["--prompt", "w5 w6 w7", "--prompt", "w9 w40", "--max-new-tokens", "9"]
    assert _run(["generate", "--model", str(folder), *prompts, "--json", str(plain)]) == 0
    assert _run(["generate", "--no-fallback", "--model", str(folder), "--exits", str(out), "--speculative", "--draft-vocab", "5",
                 "--draft-confidence", "0.5", "--draft-rule", "token_confidence", *prompts, "--json", str(spec)]) == 0
    assert [r["tokens"] for r in json.loads(spec.read_text())["rows"]] == \
        [r["tokens"] for r in json.loads(plain.read_text())["rows"]]


def test_fit_exits_bad_input(tmp_path, capsys) -> None:
    folder, _ = tiny_lm_folder(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        _run(["fit-exits", "--model", str(folder), "--out", str(tmp_path / "e"), "--fit-text",
              str(tmp_path / "missing.txt")])
    assert not (tmp_path / "e").exists()
    with pytest.raises(ValueError, match="add --fit-text"):
        _run(["fit-exits", "--model", str(folder), "--out", str(tmp_path / "e"), "--text-column", "body"])
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        _run(["fit-exits", "--model", str(folder), "--out", str(tmp_path / "kept")])
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"  # nothing replaced unasked
    with pytest.raises(SystemExit):  # the previous release's mode of generate names the command now
        _run(["generate", "--model", str(folder), "--fit-exits", str(tmp_path / "e"), "--prompt", "w5"])
    assert "offramp fit-exits --model MODEL --out" in capsys.readouterr().err


def test_collect_sweep_calibrate_and_generate_on_token_exits(tmp_path, capsys) -> None:
    """The classifier's path, for tokens: collect a token trace, sweep it, certify a threshold into the
    exits' config, and generate with it by default."""
    from offramp.cli import main

    folder, model = tiny_lm_folder(tmp_path)
    exits = DecoderExitModel.from_backbone(model, exit_layers=[1, 2, 3], base_model_name_or_path=str(folder))
    with torch.no_grad():
        for p in exits.confidence.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    exits.save_pretrained(tmp_path / "exits")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(" ".join(f"w{4 + (i * 5 + j) % 90}" for j in range(4)) for i in range(40)))
    trace = tmp_path / "trace"
    assert main(["collect", "--model", str(tmp_path / "exits"), "--prompts-file", str(prompts),
                 "--max-new-tokens", "6", "--out", str(trace)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sequences"] == 40 and 100 < summary["tokens"] <= 40 * 5 and len(summary["agreement_per_exit"]) == 3
    assert main(["sweep", "--trace", str(trace), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["sweep"]["metric"] == "agreement"
    assert {"token_confidence", "max_prob", "patience"} <= {p["rule"] for p in report["sweep"]["points"]}
    assert main(["calibrate", "--model", str(tmp_path / "exits"), "--trace", str(trace), "--policy",
                 "token_confidence", "--delta", "0.5", "--epsilon", "0.2", "--pvalue", "binomial"]) == 0
    assert "sequence risk" in capsys.readouterr().out
    stored = DecoderExitModel.from_pretrained(tmp_path / "exits", backbone=model).config
    assert stored.policy["type"] == "token_confidence" and stored.policy["threshold"] < 1.0
    assert stored.extra["calibration"]["risk"] == "sequence" and stored.extra["calibration"]["n"] == 40
    out = tmp_path / "g.json"
    assert main(["generate", "--no-fallback", "--model", str(folder), "--exits", str(tmp_path / "exits"), "--prompt", "w5 w6 w7",
                 "--max-new-tokens", "5", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["policy"] == stored.policy
    assert main(["calibrate", "--model", str(tmp_path / "exits"), "--trace", str(trace), "--risk", "disagree"]) == 2
    assert "is for classifiers" in capsys.readouterr().err
    # on real generations of the prompts (no trace), for the cache strategy it will be used with
    assert main(["calibrate", "--model", str(tmp_path / "exits"), "--prompts-file", str(prompts), "--max-new-tokens",
                 "6", "--policy", "token_confidence", "--risk", "sequence", "--token-tolerance", "0.2", "--delta", "0.5",
                 "--epsilon", "0.2", "--pvalue", "binomial", "--cache-strategy", "copy_kv"]) == 0
    printed = capsys.readouterr()
    assert "real greedy generations, cache copy_kv" in printed.out and "calibrate: " in printed.err
    stored = DecoderExitModel.from_pretrained(tmp_path / "exits", backbone=model).config
    assert stored.cache_strategy == "copy_kv" and stored.extra["calibration"]["source"] == "generation"
    assert stored.extra["calibration"]["prompts"] == 40


def test_generate_speculative_equals_greedy_and_refuses_what_it_cannot_do(tmp_path, capsys) -> None:
    folder, model = tiny_lm_folder(tmp_path)
    DecoderExitModel.from_backbone(model, exit_layers=[2, 3], head="tied").save_pretrained(tmp_path / "exits")
    DecoderExitModel.from_backbone(model, exit_layers=[2, 3], head="mamba").save_pretrained(tmp_path / "mamba-exits")
    plain, spec = tmp_path / "plain.json", tmp_path / "spec.json"
    prompts = ["--prompt", "w5 w6 w7", "--prompt", "w9 w40"]
    assert _run(["generate", "--model", str(folder), *prompts, "--max-new-tokens", "9", "--json", str(plain)]) == 0
    assert _run(["generate", "--no-fallback", "--model", str(folder), "--exits", str(tmp_path / "exits"), "--speculative",
                 "--draft-exit", "3", "--draft-tokens", "2", *prompts, "--max-new-tokens", "9",
                 "--json", str(spec)]) == 0
    assert "drafted tokens accepted" in capsys.readouterr().err
    assert [r["tokens"] for r in json.loads(spec.read_text())["rows"]] == \
        [r["tokens"] for r in json.loads(plain.read_text())["rows"]]
    planned = tmp_path / "planned.json"
    assert _run(["generate", "--no-fallback", "--model", str(folder), "--exits", str(tmp_path / "exits"), "--speculative", "--plan",
                 *prompts, "--max-new-tokens", "9", "--json", str(planned)]) == 0
    assert "speculation plan at batch" in capsys.readouterr().err
    result = json.loads(planned.read_text())
    assert [r["tokens"] for r in result["rows"]] == [r["tokens"] for r in json.loads(plain.read_text())["rows"]]
    assert {s["exit_layer"] for s in result["plan"]["settings"]} == {2, 3}
    sampled = []
    for run in range(2):  # speculative sampling, seeded: the same draws twice
        out = tmp_path / f"sampled{run}.json"
        assert _run(["generate", "--no-fallback", "--model", str(folder), "--exits", str(tmp_path / "exits"), "--speculative",
                     "--sample", "--temperature", "0.8", "--seed", "3", *prompts, "--max-new-tokens", "9",
                     "--json", str(out)]) == 0
        sampled.append([r["tokens"] for r in json.loads(out.read_text())["rows"]])
    assert sampled[0] == sampled[1] and all(len(t) == 9 for t in sampled[0])
    base = ["generate", "--model", str(folder), "--prompt", "w5"]
    for extra, message in [(["--draft-tokens", "3", "--draft-exit", "2"], "option of --speculative"),
                           (["--speculative"], "add --exits"),
                           (["--plan"], "option of --speculative"),
                           (["--speculative", "--exits", "x", "--plan", "--draft-exit", "2"], "drop --draft-exit"),
                           (["--speculative", "--exits", "x", "--repetition-penalty", "1.2"], "drop --repetition-penalty"),
                           (["--speculative", "--exits", "x", "--draft-tokens", "0", "--ngram", "0"], "n-gram matches only: add --ngram K"),
                           (["--speculative", "--exits", str(tmp_path / "exits"), "--draft-exit", "1"],
                            "not one of the model's exits"),
                           (["--speculative", "--exits", str(tmp_path / "mamba-exits")],
                            "stateful \\(Mamba\\) head, whose state cannot take back"),
                           (["--draft-vocab", "8"], "option of --speculative"),
                           (["--speculative", "--exits", "x", "--draft-vocab", "0"], "--draft-vocab must be >= 1"),
                           (["--speculative", "--exits", "x", "--draft-rule", "token_confidence"],
                            "add --draft-confidence"),
                           (["--speculative", "--exits", str(tmp_path / "exits"), "--draft-vocab", "8"],
                            "record no draft vocabulary")]:
        with pytest.raises(ValueError, match=message):
            _run(base + extra)
