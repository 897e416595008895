"""offramp serve on localhost: real HTTP requests, answers equal offline predict, bad requests answered."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest
import torch
from http_client import free_port, get, post
from tiny_assets import write_csv, write_model

from offramp import EarlyExitModel
from offramp.cli import common, main
from offramp.policies import make_policy

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.serving

TEXTS = ["good great fine", "bad awful", "okay neutral words here", "great great great", "so so", "bad good"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from offramp.serving.app import ServeOptions, serve_checkpoint, shutdown

    root = tmp_path_factory.mktemp("serve")
    model, csv = write_model(root / "tiny"), write_csv(root / "d.csv", n=120)
    threads = torch.get_num_threads()
    assert main(["--threads", "1", "train", "--model", str(model), "--data", str(csv), "--out", str(root / "run"),
                 "--epochs", "2", "--lr", "1e-2", "--batch-size", "16", "--policy", "entropy", "--value", "0.9"]) == 0
    torch.set_num_threads(threads)
    opts = ServeOptions(max_batch_size=8, batch_wait_ms=20, max_texts=8,
                        policies={"eager": {"type": "max_prob", "threshold": 0.3}})
    url = serve_checkpoint(str(root / "run"), opts, port=free_port(), blocking=False)
    yield url, root / "run"
    shutdown()


def _offline(run, texts, policy=None):
    model = EarlyExitModel.from_pretrained(common.checkpoint_dir(run))
    pol = make_policy(policy) if policy is not None else make_policy(model.config.policy)
    return [{k: v for k, v in r.items() if k != "text"} for r in common.predict_rows(model, texts, pol, max_length=64)]


def _same(served: list[dict], offline: list[dict]) -> None:
    assert len(served) == len(offline)
    for s, o in zip(served, offline):
        assert s["label"] == o["label"] and s["exit_layer"] == o["exit_layer"]
        assert s["confidence"] == pytest.approx(o["confidence"], abs=2e-3)


def test_answers_equal_offline_predict(server):
    url, run = server
    health = get(url + "/health")
    assert health["status"] == "ok" and health["default_policy"]["type"] == "entropy"
    status, out = post(url + "/classify", {"texts": TEXTS})
    assert status == 200 and all(r["policy"] == "entropy" for r in out["results"])
    _same(out["results"], _offline(run, TEXTS))
    status, out = post(url + "/classify", {"texts": TEXTS[:3], "policy": "eager"})
    assert status == 200
    _same(out["results"], _offline(run, TEXTS[:3], {"type": "max_prob", "threshold": 0.3}))
    status, out = post(url + "/classify", {"text": TEXTS[0], "policy": "never"})
    assert status == 200 and out["results"][0]["exit_layer"] == 4


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server):
    url, _ = server
    cases = [({"texts": []}, 400, "non-empty list"), ({"texts": ["ok", "  "]}, 400, "text 2 is empty"),
             ({"texts": ["a"] * 9}, 413, "at most 8"), ({"texts": ["x" * 100_001]}, 413, "tokens anyway"),
             ({"texts": ["ok"], "policy": "fastest"}, 400, "unknown policy 'fastest'"),
             ({"texts": ["ok"], "policy": "oracle"}, 400, "needs labels"),
             ({"texts": ["ok"], "extra": 1}, 400, "unknown fields"), ([1, 2], 400, "JSON object"),
             ({"texts": "ok"}, 400, "non-empty list")]
    for body, status, message in cases:
        got, out = post(url + "/classify", body)
        assert got == status and message in out["error"], (body, out)
    got, out = post(url + "/classify", b"{not json", raw=True)
    assert got == 400 and "not valid JSON" in out["error"]
    assert post(url + "/classify", {"text": "still fine"})[0] == 200


def test_concurrent_clients_are_batched_and_nothing_is_lost(server):
    url, run = server
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(48)]
    expected = {t: r for t, r in zip(texts, _offline(run, texts))}
    answers: dict[str, list[dict]] = {}
    before = get(url + "/metrics")

    def client(k: int) -> None:
        for t in texts[k::8]:
            status, out = post(url + "/classify", {"text": t})
            assert status == 200
            answers.setdefault(t, []).append(out["results"][0])

    workers = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(answers) == sorted(texts) and all(len(v) == 1 for v in answers.values())  # none lost or doubled
    for t in texts:
        _same(answers[t], [expected[t]])
    after = get(url + "/metrics")
    rows, batches = after["rows"] - before["rows"], after["batches"] - before["batches"]
    assert rows == len(texts) and batches < len(texts)  # concurrent requests shared batches
    exits = Counter({int(k): v for k, v in after["exits_per_layer"].items()})
    exits.subtract(Counter({int(k): v for k, v in before["exits_per_layer"].items()}))
    assert sum(exits.values()) == len(texts)


POISON = [({"text": "fine \ud800 words"}, 400, "lone surrogate (U+D800) at character 5"),
          ({"texts": ["good", 7]}, 400, "text 2 must be a string, got int"),
          ({"texts": [float("nan")]}, 400, "text 1 must be a string, got float")]


def test_poisoned_requests_fail_alone_and_every_good_neighbour_is_answered(server):
    """Good and poisoned requests arrive together from many clients: each poisoned one gets its 4xx
    JSON, and every good one its right answer."""
    url, run = server
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(32)]
    expected = {t: r for t, r in zip(texts, _offline(run, texts))}
    answers: dict[str, dict] = {}
    refused: list[tuple[int, dict, int, str]] = []
    go = threading.Barrier(6)

    def good(k: int) -> None:
        go.wait()
        for t in texts[k::4]:
            status, out = post(url + "/classify", {"text": t})
            assert status == 200, out
            answers[t] = out["results"][0]

    def bad() -> None:
        go.wait()
        for _ in range(3):
            for body, status, message in POISON:
                refused.append((*post(url + "/classify", body), status, message))

    workers = [threading.Thread(target=good, args=(k,)) for k in range(4)] + [threading.Thread(target=bad)
                                                                              for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(answers) == sorted(texts)
    for t in texts:
        _same([answers[t]], [expected[t]])
    assert len(refused) == 2 * 3 * len(POISON)
    for got, out, status, message in refused:
        assert got == status and message in out["error"], out


def _serve_cmd(argv: list[str]) -> int:
    import argparse

    from offramp.cli.serve import add_serve_parser

    parser = argparse.ArgumentParser(prog="offramp")
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", *argv])
    return int(args.func(args) or 0)


def test_serve_refuses_bad_options_before_starting(tmp_path, server):
    _, run = server
    with pytest.raises(ValueError, match="--replicas must be >= 1"):
        _serve_cmd([str(run), "--replicas", "0"])
    with pytest.raises(ValueError, match="--policies is not valid JSON"):
        _serve_cmd([str(run), "--policies", "{x"])
    with pytest.raises(ValueError, match="--policies 'x'"):
        _serve_cmd([str(run), "--policies", '{"x": {"type": "nope"}}'])
    with pytest.raises(ValueError, match="not an offramp checkpoint"):
        _serve_cmd([str(tmp_path)])
    port = int(server[0].rsplit(":", 1)[1])  # the running server's port: in use
    with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is in use"):
        _serve_cmd([str(run), "--port", str(port)])


def test_health_states_the_calibrated_bound(server, tmp_path):
    import shutil

    from offramp.config import CONFIG_NAME
    from offramp.serving.service import ClassifyService

    _, run = server
    assert ClassifyService(run).health()["calibration"] is None  # never calibrated
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = common.checkpoint_dir(copy)
    config = json.loads((ckpt / CONFIG_NAME).read_text())
    config["extra"] = {**config.get("extra", {}), "calibration": {
        "method": "ltt", "risk": "disagree", "delta": 0.1, "epsilon": 0.05, "n": 200, "threshold": 0.4,
        "bound": "threshold=0.4: P(disagree risk <= 0.1) >= 0.95"}}
    (ckpt / CONFIG_NAME).write_text(json.dumps(config))
    health = ClassifyService(copy).health()
    assert health["calibration"] == {"bound": "threshold=0.4: P(disagree risk <= 0.1) >= 0.95", "risk": "disagree",
                                     "delta": 0.1, "epsilon": 0.05, "n": 200, "threshold": 0.4}


def test_the_local_ray_listens_on_loopback_only(server):
    """Every socket Ray's processes listen on (GCS, raylet, workers, Serve's controller and proxy,
    the dashboard agent and its metrics exporter) is bound to 127.0.0.1."""
    import ipaddress

    import psutil

    ray_pids = {p.pid for p in psutil.process_iter(["name", "cmdline"])
                if any(k in " ".join(p.info["cmdline"] or [p.info["name"] or ""]) for k in ("ray::", "raylet",
                                                                                               "gcs_server", "ray/"))}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ray_pids]
    assert len(listening) >= 5  # the GCS, the raylet, the proxy, ... were found
    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return address.is_loopback or getattr(address, "ipv4_mapped", None) is not None and address.ipv4_mapped.is_loopback

    open_to_all = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in listening if not loopback(c.laddr.ip)]
    assert not open_to_all, open_to_all
