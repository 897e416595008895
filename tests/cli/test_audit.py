"""The hardening audit's cases, kept as a table so none comes back: each bad input, crafted or
wrong-typed file and contradicting flag must end in one clear ``offramp <command>: error:`` line
that names the field, file or value (exit status 2, no traceback, nothing written), and each case
the audit found wrongly refused must run.

The cases of the other audit families have their own tests: crafted pickles and folders that ask to
run code (``tests/modeling/test_safe_loading.py``), configs that would exhaust memory
(``test_config_bombs.py``), outputs that replace their inputs and ``.NAME.old`` readers
(``test_own_inputs.py``), bad and poisoned server requests (``tests/serving``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from decoder_models import tiny_lm_folder
from reasoning import always_accepting_probe, tiny_lm, tiny_tokenizer
from tiny_assets import write_csv, write_model

from offramp.cli import main
from offramp.modeling import DecoderExitModel

COMMON = ["--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A trained classifier run and its trace, a tiny LM with token exits, a reasoning LM with a
    calibrated probe and an event dataset: the audit's inputs, copied per case."""
    from offramp.data.tasks import Problem
    from offramp.engines.reason import ReasonConfig
    from offramp.evaluation.events import _config_dict, build_dataset

    root = tmp_path_factory.mktemp("audit")
    model, csv = write_model(root / "tiny"), write_csv(root / "d.csv", n=60)
    threads = torch.get_num_threads()
    assert main([*COMMON, "train", "--model", str(model), "--data", str(csv), "--out", str(root / "run"),
                 "--epochs", "1", "--batch-size", "16"]) == 0
    assert main([*COMMON, "collect", "--model", str(root / "run"), "--out", str(root / "trace")]) == 0
    torch.set_num_threads(threads)
    folder, lm = tiny_lm_folder(root)
    DecoderExitModel.from_backbone(lm, exit_layers=[1, 2], base_model_name_or_path=str(folder)).save_pretrained(
        root / "exits")
    tok = tiny_tokenizer()
    tiny_lm(len(tok)).save_pretrained(root / "rlm")
    tok.save_pretrained(root / "rlm")
    config = ReasonConfig(max_new_tokens=8, max_answer_tokens=2)
    always_accepting_probe(32).save(root / "probe", extra={"model": str(root / "rlm"),
                                                             "reason_config": _config_dict(config)})
    questions = ["add two and three", "add three and two", "Solve it", "so add two", "two and two", "add it"]
    build_dataset(tiny_lm(len(tok)).eval(), tok, [Problem(f"t{i}", q, "5", "test") for i, q in enumerate(questions)],
                  root / "events", config=ReasonConfig(max_new_tokens=20, max_answer_tokens=2, feature_layers=(1, -1)),
                  model_name=str(root / "rlm"))
    return root


def _json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _state(path: Path, **fields) -> None:
    state = torch.load(path, weights_only=True)
    state.update(fields)
    torch.save(state, path)


def _pickled_bin(root: Path) -> None:
    (root / "binlm").mkdir()
    shutil.copy(root / "lm" / "config.json", root / "binlm" / "config.json")
    torch.save({"weight": torch.zeros(2), "extra": np.dtype("float32")}, root / "binlm" / "pytorch_model.bin")


RUN_CONFIG = "run/checkpoint/offramp_config.json"
STATE = "run/checkpoint/training_state.pt"
PROBE = "probe/probe.json"
LM_RUN = ["generate", "--model", "{lm}", "--exits", "{exits}", "--prompt", "w5 w6", "--max-new-tokens", "2"]
REASON_RUN = ["reason", "run", "--model", "{rlm}", "--probe", "{probe}", "--question", "add two and three",
              "--max-new-tokens", "8"]

# (case, edit of the workspace copy, argv, what the error must say)
CASES: list[tuple[str, Callable[[Path], None] | None, list[str], str]] = [
    ("policy-unknown-field", None, ["predict", "--model", "{run}", "--policy", '{"type": "probe", "bogus": 1}',
                                    "good"], "unknown field 'bogus' in the 'probe' policy; it takes type, path, probe"),
    ("policy-unknown-field-rule", None, ["predict", "--model", "{run}", "--policy",
                                         '{"type": "entropy", "threshold": 0.3, "patience": 2}', "good"],
     "unknown field 'patience' in the 'entropy' policy; it takes type, threshold"),
    ("head-dropout-string", lambda r: _json(r / RUN_CONFIG, lambda d: d["head"].update(dropout="x")),
     ["predict", "--model", "{run}", "good"], "head.dropout must be a number, got 'x'"),
    ("halting-layers-string", lambda r: _json(r / RUN_CONFIG, lambda d: d.update(halting={"num_layers": "x"})),
     ["predict", "--model", "{run}", "good"], "halting.num_layers must be an integer, got 'x'"),
    ("halting-layers-huge", lambda r: _json(r / RUN_CONFIG, lambda d: d.update(halting={"num_layers": 10**9})),
     ["predict", "--model", "{run}", "good"], "halting.num_layers must be in [0, 16]"),
    ("extra-data-list", lambda r: _json(r / RUN_CONFIG, lambda d: d.update(extra={"data": [1, 2]})),
     ["evaluate", "--model", "{run}"], "extra.data must be a JSON object, got [1, 2]"),
    ("probe-policy-in-classifier", lambda r: _json(r / RUN_CONFIG, lambda d: d.update(policy={"type": "probe"})),
     ["predict", "--model", "{run}", "good"], "policy 'probe' does not exit a classifier's layers"),
    ("trace-meta-list", lambda r: _json(r / "trace/trace.json", lambda d: d.update(meta=[1])),
     ["sweep", "--trace", "{trace}", "--out", "{root}/report"], "'meta' must be a JSON object, got [1]"),
    ("state-epoch-string", lambda r: _state(r / STATE, epoch="x"),
     ["train", "--out", "{run}", "--resume", "--epochs", "3"], "its epoch ('x') and history"),
    ("state-history-string", lambda r: _state(r / STATE, history="x"),
     ["train", "--out", "{run}", "--resume", "--epochs", "3"], "got str) do not agree"),
    ("state-negative-epoch", lambda r: _state(r / STATE, epoch=-3),
     ["train", "--out", "{run}", "--resume", "--epochs", "3"], "its epoch (-3) and history"),
    ("exit-layers-letters", None, ["train", "--model", "{tiny}", "--data", "{d}", "--out", "{root}/new",
                                   "--exit-layers", "a,b"], "--exit-layers must be 'all' or comma-separated"),
    ("head-unknown-key", lambda r: _json(r / "exits/offramp_config.json", lambda d: d["head"].update(bogus=3)),
     LM_RUN, "head: unknown key ['bogus'] for a 'ffn' exit head"),
    ("speculative-with-cache-strategy", None, [*LM_RUN, "--speculative", "--cache-strategy", "copy_kv"],
     "drop --cache-strategy"),
    ("json-is-a-folder", None, [*LM_RUN, "--json", "{root}"], "is a folder: name a file in it"),
    ("pickled-bin-model", _pickled_bin, ["generate", "--model", "{root}/binlm", "--prompt", "w5"],
     "its weights file is a pickle that holds more than tensors"),
    ("non-utf8-text-argument", None, ["predict", "--model", "{run}", "good \udcff day"],
     "text 1 is not UTF-8 (byte 0xff at character 5)"),
    ("non-utf8-prompt", None, [*LM_RUN[:5], "--prompt", "w5 \udce9"], "--prompt 1 is not UTF-8 (byte 0xe9"),
    ("reason-empty-question", None, ["reason", "run", "--model", "{rlm}", "--question", ""], "--question is empty"),
    ("reason-layers-letters", None, [*REASON_RUN, "--layers", "a,b"], "--layers must be comma-separated"),
    ("reason-past-positions", None, [*REASON_RUN[:-1], "600"], "past the model's 512"),
    ("probe-quantiles-strings", lambda r: _json(r / PROBE, lambda d: d.update(quantiles=["a", "b"])),
     REASON_RUN, "'quantiles' must hold numbers (null for infinity)"),
    ("probe-reason-config-string", lambda r: _json(r / PROBE, lambda d: d["extra"].update(reason_config="x")),
     REASON_RUN, "extra.reason_config must be a JSON object"),
    ("probe-pt-text", lambda r: (r / "probe/probe.pt").write_text("hello\n"), REASON_RUN,
     "probe.pt is not a readable LYNX probe weights"),
    ("probe-pt-random-bytes", lambda r: (r / "probe/probe.pt").write_bytes(np.random.default_rng(0).bytes(999)),
     REASON_RUN, "probe.pt is not a readable LYNX probe weights: it is not a file torch.save wrote"),
    ("events-manifest-config-string", lambda r: _json(r / "events/manifest.json", lambda d: d.update(config="x")),
     ["reason", "fit", "{events}", "--delta", "0.4", "--out", "{root}/p2"], "'config' must be a JSON object"),
]


@pytest.mark.parametrize("case, edit, argv, match", CASES, ids=[c[0] for c in CASES])
def test_audit_case_is_a_clear_error(ws, tmp_path, capsys, case, edit, argv, match):
    argv = list(argv)
    root = tmp_path / "ws"
    shutil.copytree(ws, root)
    if edit is not None:
        edit(root)
    names = {"root": str(root), **{p.stem: str(p) for p in root.iterdir()}}
    for i, a in enumerate(argv):
        for name, path in names.items():
            a = a.replace("{" + name + "}", path)
        argv[i] = a
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    capsys.readouterr()
    rc = main([*COMMON, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert match in err, err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written


def test_state_cache_off_with_full_fine_tuning_runs(ws, tmp_path):
    """The audit found `--state-cache off` refused with --full: off is what --full needs anyway."""
    assert main([*COMMON, "train", "--model", str(ws / "tiny"), "--data", str(ws / "d.csv"), "--out",
                 str(tmp_path / "full"), "--full", "--state-cache", "off", "--epochs", "1", "--batch-size", "16"]) == 0
    assert (tmp_path / "full" / "checkpoint" / "backbone").is_dir()
