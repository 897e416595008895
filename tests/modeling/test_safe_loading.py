"""Nothing offramp loads can run code: a crafted pickle in every kind of file it reads is refused.

Each case plants a payload that, if unpickled, would write a marker file; the loader must raise a
ValueError naming the file, and the marker must not exist afterwards.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from paths import ROOT
from tiny_assets import write_csv, write_model

from offramp.cli import main

MARKER = Path("/tmp") / f"offramp-payload-ran-{__import__('os').getpid()}"


class Payload:
    """Unpickling this runs code: it writes MARKER."""

    def __reduce__(self):
        return (exec, (f"open({str(MARKER)!r}, 'w').write('ran')",))


def plant_pickle(path: Path) -> None:
    """Replace ``path`` by a torch-saved pickle that runs code when unpickled."""
    path.unlink(missing_ok=True)
    torch.save({"state": Payload(), "weight": torch.zeros(2)}, path)


@pytest.fixture(autouse=True)
def no_marker():
    MARKER.unlink(missing_ok=True)
    yield
    assert not MARKER.exists(), "a crafted file ran code"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safe")
    model, csv = write_model(root / "tiny"), write_csv(root / "d.csv", n=60)
    assert main(["--threads", "1", "--quiet", "train", "--model", str(model), "--data", str(csv), "--out",
                 str(root / "run"), "--epochs", "1", "--batch-size", "16"]) == 0
    assert main(["--threads", "1", "--quiet", "collect", "--model", str(root / "run"), "--out",
                 str(root / "trace")]) == 0
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_training_state_on_resume(run, tmp_path, capsys):
    out = _copy(run / "run", tmp_path / "run")
    plant_pickle(out / "checkpoint" / "training_state.pt")
    assert main(["--threads", "1", "train", "--out", str(out), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "training_state.pt: refused to load" in err and "it asks for exec" in err


def test_jei_training_state(run, tmp_path):
    from offramp import EarlyExitModel
    from offramp.training.jei import JEIArgs, _load_state

    out = _copy(run / "run", tmp_path / "jei")
    plant_pickle(out / "checkpoint" / "jei_state.pt")
    model = EarlyExitModel.from_pretrained(out)
    with pytest.raises(ValueError, match="jei_state.pt: refused to load"):
        _load_state(model, JEIArgs(output_dir=str(out), resume=True))


def test_exit_heads(run, tmp_path):
    from offramp import EarlyExitModel

    out = _copy(run / "run" / "checkpoint", tmp_path / "ckpt")
    plant_pickle(out / "offramp_heads.safetensors")
    with pytest.raises(ValueError, match="offramp_heads.safetensors is not a readable safetensors file"):
        EarlyExitModel.from_pretrained(out)


def test_backbone_folder_with_a_pickled_weights_file(run, tmp_path):
    from offramp import EarlyExitModel

    out = _copy(run / "run" / "checkpoint", tmp_path / "ckpt")
    (out / "backbone" / "model.safetensors").unlink()
    plant_pickle(out / "backbone" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refused to load the backbone .*pickle"):
        EarlyExitModel.from_pretrained(out)


def test_trace(run, tmp_path):
    from offramp.evaluation.collect import ExitTrace

    out = _copy(run / "trace", tmp_path / "trace")
    plant_pickle(out / "trace.safetensors")
    with pytest.raises(ValueError, match="trace.safetensors is not a readable safetensors file"):
        ExitTrace.load(out)


def test_event_dataset(tmp_path):
    from offramp.evaluation.events import load_dataset

    np.savez(tmp_path / "p0.npz", features=np.array([Payload()], dtype=object), labels=np.zeros(1, np.int64),
             trace=np.array("{}"))
    with pytest.raises(ValueError, match="p0.npz is not a readable event file.*pickled objects are refused"):
        load_dataset(tmp_path)


def test_probe(tmp_path):
    from offramp.calibration.lynx import LynxProbe

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype(np.float32), np.arange(40) % 2
    LynxProbe(hidden=(8,), epochs=5, seed=0).fit(x, y).save(tmp_path / "probe")
    LynxProbe.load(tmp_path / "probe")  # the real one loads
    plant_pickle(tmp_path / "probe" / "probe.pt")
    with pytest.raises(ValueError, match="probe.pt: refused to load the LYNX probe weights"):
        LynxProbe.load(tmp_path / "probe")


def test_decoder_exits(tmp_path):
    from decoder_models import tiny_decoder

    from offramp.modeling import HEADS_NAME, DecoderExitModel

    lm = tiny_decoder("llama")
    DecoderExitModel.from_backbone(lm, exit_layers=[2, 3], head="ffn").save_pretrained(tmp_path / "exits")
    plant_pickle(tmp_path / "exits" / HEADS_NAME)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        DecoderExitModel.from_pretrained(tmp_path / "exits", backbone=lm)


def test_no_loader_unpickles_or_trusts_remote_code():
    """An audit of the source: every torch.load goes through load_torch_state (weights_only=True), no
    pickle / eval / exec, no np.load with allow_pickle=True, no trust_remote_code=True."""
    root = ROOT
    files = [*root.glob("src/offramp/**/*.py"), *root.glob("benchmarks/*.py"), *root.glob("scripts/*.py")]
    assert files
    for f in files:
        text = f.read_text()
        loads = text.count("torch.load(")
        if f.name == "utils.py":
            assert loads == 1 and "torch.load(path, weights_only=True" in text
        else:
            assert loads == 0, f"{f}: torch.load outside load_torch_state"
        for bad in ("pickle.load", "allow_pickle=True", "trust_remote_code=True", "eval(", "exec("):
            hits = [ln for ln in text.splitlines() if bad in ln and ".eval()" not in ln]
            assert not hits, f"{f}: {bad}: {hits}"


# -- a folder that asks to run its own code ---------------------------------------------------------

EVIL = f"open({str(MARKER)!r}, 'w').write('ran')\n"


def _asks_for_code(folder: Path, *, model: bool, tokenizer: bool) -> Path:
    """Give ``folder`` an ``auto_map`` pointing at ``evil.py``, whose import writes MARKER."""
    (folder / "evil.py").write_text(EVIL + "from transformers import PretrainedConfig, PreTrainedModel\n"
                                    "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
                                    "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n")
    if model:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type="evil", architectures=["EvilModel"],
                   auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                             "AutoModelForCausalLM": "evil.EvilModel"})
        (folder / "config.json").write_text(json.dumps(cfg))
    if tokenizer:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def answer_yes(monkeypatch):
    """A "y" waiting on stdin, as `printf 'y\\n' | offramp ...` gives: transformers' question would take it."""
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\ny\n"))


def test_a_causal_lm_that_asks_for_its_code_is_refused_whatever_stdin_holds(tmp_path, answer_yes, capsys):
    from decoder_models import tiny_lm_folder

    folder, _ = tiny_lm_folder(tmp_path)
    _asks_for_code(folder, model=True, tokenizer=False)
    assert main(["--threads", "1", "generate", "--model", str(folder), "--prompt", "w4 w5",
                 "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "needs to run its own Python code" in err and "never runs code" in err, err


def test_a_tokenizer_that_asks_for_its_code_is_refused(run, tmp_path, answer_yes, capsys):
    """The crafted tokenizer sits in a trained checkpoint: `evaluate` loads it with the model."""
    out = _copy(run / "run", tmp_path / "run")
    _asks_for_code(out / "checkpoint", model=False, tokenizer=True)
    assert main(["--threads", "1", "evaluate", "--model", str(out), "--data", str(run / "d.csv")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint's tokenizer" in err and "needs to run its own Python code" in err, err


def test_an_encoder_backbone_that_asks_for_its_code_is_refused(run, tmp_path, answer_yes, capsys):
    model = _asks_for_code(_copy(run / "tiny", tmp_path / "tiny"), model=True, tokenizer=True)
    assert main(["--threads", "1", "train", "--model", str(model), "--data", str(run / "d.csv"), "--out",
                 str(tmp_path / "out"), "--epochs", "1"]) == 2
    assert "needs to run its own Python code" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_trust_remote_code_is_refused_in_the_api(run):
    from offramp.modeling import load_hf_model

    from transformers import AutoModel

    with pytest.raises(ValueError, match="never runs code"):
        load_hf_model(AutoModel, run / "tiny", "model", trust_remote_code=True)
