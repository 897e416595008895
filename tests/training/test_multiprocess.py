"""Training on two processes (torchrun, gloo on the CPU) equals training on one with the same global batches,
also when the two-process run is interrupted after its first checkpoint and resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from paths import HELPERS
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

pytestmark = pytest.mark.multiprocess  # a later tier of .ci/run (pyproject: markers)

WORKER = HELPERS / "multiprocess_worker.py"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("mp") / "bert"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(path)
    return str(path)


def _run(argv: list[str], code: int = 0) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every worker it started
        proc.communicate()
        raise
    assert proc.returncode == code, err[-3000:]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {f"heads.{k}": v for k, v in load_file(ckpt / "offramp_heads.safetensors").items()}
    for f in (ckpt / "backbone").glob("*.safetensors"):
        out.update({f"backbone.{k}": v for k, v in load_file(f).items()})
    return out


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.parametrize("mode", ["frozen", "full", "jei"])
def test_two_processes_train_as_one(backbone, tmp_path, mode):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(WORKER), mode, backbone, str(one)])
    _run([*TORCHRUN, str(WORKER), mode, backbone, str(two)])
    _same(one, two)


@pytest.mark.parametrize("mode", ["frozen", "full", "jei"])
def test_two_processes_resume_as_one(backbone, tmp_path, mode):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(WORKER), mode, backbone, str(one)])
    _run([*TORCHRUN, str(WORKER), mode, backbone, str(two), "stop"], code=1)  # a worker exited with 3
    first = _weights(two / "checkpoint")
    _run([*TORCHRUN, str(WORKER), mode, backbone, str(two), "resume"])
    assert any(not torch.equal(first[k], v) for k, v in _weights(two / "checkpoint").items())  # it trained on
    _same(one, two)


def _same(one: Path, two: Path) -> None:
    a, b = _weights(one / "checkpoint"), _weights(two / "checkpoint")
    assert a.keys() == b.keys() and any(k.startswith("heads.") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)
    assert not list(two.glob("*.tmp*")) and (two / "metrics.json").is_file()
