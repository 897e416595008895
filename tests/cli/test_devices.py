"""--device and --dtype on every command that loads a model: a GPU this machine lacks (or a device
that does not exist) is a clear error naming the fix, before any work and before anything is written."""

from __future__ import annotations

import pytest
import torch
from decoder_models import tiny_lm_folder
from tiny_assets import write_csv, write_model

from offramp.cli import build_parser, main
from offramp.devices import resolve_device

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA answers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    model, csv = write_model(root / "tiny"), write_csv(root / "d.csv", n=40)
    threads = torch.get_num_threads()
    assert main(["--threads", "1", "--quiet", "train", "--model", str(model), "--data", str(csv), "--out",
                 str(root / "run"), "--epochs", "1", "--batch-size", "16"]) == 0
    torch.set_num_threads(threads)
    lm, _ = tiny_lm_folder(root)
    return {"model": str(model), "csv": str(csv), "run": str(root / "run"), "lm": str(lm), "root": root}


COMMANDS = {  # each command that loads a model, with what it needs besides --device; OUT is what it would write
    "train": ["train", "--model", "{model}", "--data", "{csv}", "--out", "{out}"],
    "collect": ["collect", "--model", "{run}", "--out", "{out}"],
    "evaluate": ["evaluate", "--model", "{run}", "--json", "{out}"],
    "predict": ["predict", "--model", "{run}", "good words"],
    "calibrate": ["calibrate", "--model", "{run}"],
    "train-lm": ["train-lm", "--arch", "llama", "--out", "{out}", "--max-steps", "1"],
    "fit-exits": ["fit-exits", "--model", "{lm}", "--out", "{out}"],
    "generate": ["generate", "--model", "{lm}", "--prompt", "w5 w6", "--json", "{out}"],
    "reason run": ["reason", "run", "--model", "{lm}", "--question", "w5", "--out", "{out}"],
    "reason build": ["reason", "build", "--model", "{lm}", "--task", "{csv}", "--n", "2", "--out", "{out}"],
    "serve": ["serve", "{run}", "--port", "8931"],
    "demo": ["demo", "--out", "{out}"],
    "bench": ["bench", "--model", "{run}", "--json", "{out}"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda: this torch .* built without CUDA|--device cuda: torch sees no CUDA GPU"),
    ("cuda:1", "--device cuda:1: "),
    ("tpu", "unknown device 'tpu': use auto"),
])
def test_a_device_this_machine_lacks_is_an_error_before_any_work(assets, tmp_path, capsys, command, device,
                                                                  message):
    out = tmp_path / "out"
    argv = [a.format(out=out, **assets) for a in COMMANDS[command]] + ["--device", device]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"offramp {command}: error:" in err
    import re

    assert re.search(message, err), err
    assert "--device cpu" in err or "use auto" in err  # the fix is named
    assert not out.exists()


def test_every_command_that_loads_a_model_takes_device_and_dtype():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in COMMANDS:
        p = sub.choices[name.split()[0]]
        if " " in name:
            p = next(a for a in p._actions if a.dest == "reason_command").choices[name.split()[1]]
        options = {o for a in p._actions for o in a.option_strings}
        if name == "bench":  # its options belong to the benchmark's own parser
            from offramp.cli.bench import bench_parser

            options = {o for a in bench_parser()._actions for o in a.option_strings}
        assert {"--device", "--dtype"} <= options, name


def test_auto_is_the_cpu_here_and_a_torch_device_passes_through():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cpu"):
        resolve_device(torch.device("cuda", 0))


def test_the_python_api_refuses_a_missing_gpu_before_reading_the_folder(tmp_path):
    from offramp import EarlyExitModel
    from offramp.modeling.causal_lm import load_causal_lm

    with pytest.raises(ValueError, match="--device cuda"):
        EarlyExitModel.from_pretrained(tmp_path / "does-not-exist", device="cuda")
    with pytest.raises(ValueError, match="--device cuda"):
        load_causal_lm(str(tmp_path / "does-not-exist"), device="cuda")
