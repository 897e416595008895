"""A bounded load test of ``offramp serve`` on localhost: throughput and latency with exits against
the same server with the never-exit rule, at several numbers of concurrent clients, and the
offline batch speed-up of the same rule on the same texts (CPU, offline).

Each client sends one text per request, one request at a time, over one kept-alive connection;
every answer is checked against offline ``predict`` (none lost, none duplicated, same label and
exit). The served speed-up is throughput(exits) / throughput(never) at each concurrency;
``of_offline`` divides it by the offline speed-up of early exit on batches of --max-batch-size.

The ceiling: the server adds a cost per request (HTTP, the proxy, Ray's hop to the replica,
JSON) that exits cannot shorten. At each concurrency the replica's batches are counted (``/metrics``
before and after the run), the offline model time of exits and never-exit is measured at that
mean batch size, and ``ceiling_speedup = wall(never) / (wall(never) - model time exits save)``:
the served speed-up if exits saved their full offline time and the server nothing else.
``of_ceiling`` is the measured served speed-up as a fraction of it.

Example: ``python benchmarks/serve_load.py --texts 256 --clients 1 8 32``. Without --checkpoint it
trains a small MiniLM checkpoint on the offline tweets once (into ~/.cache/offramp/serve-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

CACHE = Path(os.path.expanduser("~/.cache/offramp"))


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def checkpoint(path: str | None) -> str:
    if path:
        return path
    out = CACHE / "serve-bench"
    if not (out / "checkpoint").is_dir():
        from offramp.cli import main

        log("training a MiniLM checkpoint on tweets (once)")
        assert main(["--threads", "2", "train", "--model", "minilm", "--data", "tweets", "--max-train", "2000",
                     "--max-eval", "500", "--epochs", "6", "--out", str(out), "--overwrite"]) == 0
    return str(out)


def post(url: str, body: dict) -> tuple[dict, float]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
    return out, time.perf_counter() - t0


def load(url: str, texts: list[str], clients: int, policy: str) -> dict:
    import http.client
    from urllib.parse import urlparse

    answers: dict[int, list] = {}
    latencies: list[float] = []
    lock = threading.Lock()
    where = urlparse(url)

    def client(k: int) -> None:  # one kept-alive connection per client, as HTTP clients do
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=300)
        for i in range(k, len(texts), clients):
            t0 = time.perf_counter()
            conn.request("POST", "/classify", body=json.dumps({"text": texts[i], "policy": policy}),
                         headers={"content-type": "application/json"})
            r = conn.getresponse()
            out = json.loads(r.read())
            dt = time.perf_counter() - t0
            assert r.status == 200, out
            with lock:
                answers.setdefault(i, []).append(out["results"][0])
                latencies.append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {"wall_s": wall, "texts_per_s": len(texts) / wall, "p50_s": float(np.percentile(lat, 50)),
            "p99_s": float(np.percentile(lat, 99)), "answers": answers}


def offline_speedup(run: str, texts: list[str], policy: dict, batch: int, repeats: int) -> dict:
    import torch

    from offramp import EarlyExitModel
    from offramp.cli import common
    from offramp.data.batching import encode_texts
    from offramp.policies import make_policy

    model = EarlyExitModel.from_pretrained(common.checkpoint_dir(run)).eval()
    tok = common.tokenizer_of(model)
    encs = [encode_texts(texts[i:i + batch], tok, max_length=64) for i in range(0, len(texts), batch)]
    times = {}
    for name, pol in (("exits", make_policy(policy)), ("never", make_policy("never"))):
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                for enc in encs:
                    model.predict(enc["input_ids"], enc["attention_mask"], pol,
                                  token_type_ids=enc.get("token_type_ids"))
            runs.append(time.perf_counter() - t0)
        times[name] = float(np.median(runs))
    return {"batch": batch, "exits_s": times["exits"], "never_s": times["never"],
            "speedup": times["never"] / times["exits"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--policy", default='{"type": "entropy", "threshold": 0.9}', help="the exit rule (JSON)")
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the replica and the offline run")
    ap.add_argument("--repeats", type=int, default=3, help="offline timings (median)")
    ap.add_argument("--rounds", type=int, default=3, help="load runs per rule and concurrency, interleaved (median)")
    ap.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = ap.parse_args(argv)
    import torch

    from offramp.cli import common
    from offramp.data import load_data
    from offramp.serving.app import ServeOptions, serve_checkpoint, shutdown
    from offramp.utils import atomic_write_json

    torch.set_num_threads(args.threads)
    run = checkpoint(args.checkpoint)
    policy = json.loads(args.policy)
    texts = list(load_data("tweets", max_eval=args.texts).test.texts[: args.texts])
    offline = offline_speedup(run, texts, policy, args.max_batch_size, args.repeats)
    log(f"offline batch speed-up {offline['speedup']:.2f}")
    from offramp import EarlyExitModel
    from offramp.policies import make_policy

    model = EarlyExitModel.from_pretrained(common.checkpoint_dir(run))
    expected = {name: list(common.predict_rows(model, texts, make_policy(spec), max_length=64))
                for name, spec in (("exits", policy), ("never", {"type": "never"}))}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = ServeOptions(max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_texts=64,
                        threads=args.threads, policies={"exits": policy, "never": {"type": "never"}})
    url = serve_checkpoint(run, opts, port=port, blocking=False)
    rows = []
    try:
        post(url + "/classify", {"texts": texts[:8]})  # warm-up
        for clients in args.clients:
            runs: dict[str, list[dict]] = {"exits": [], "never": []}
            for _ in range(args.rounds):  # interleaved: both rules share the machine's load
                for name in ("exits", "never"):
                    before = json.loads(urllib.request.urlopen(url + "/metrics", timeout=60).read())
                    res = load(url, texts, clients, name)
                    after = json.loads(urllib.request.urlopen(url + "/metrics", timeout=60).read())
                    res["replica_batches"] = after["batches"] - before["batches"]
                    res["mean_batch_rows"] = (after["rows"] - before["rows"]) / max(res["replica_batches"], 1)
                    answers = res.pop("answers")
                    res["complete"] = sorted(answers) == list(range(len(texts))) and all(
                        len(v) == 1 for v in answers.values())
                    res["equal_to_offline"] = sum(answers[i][0]["label"] == expected[name][i]["label"]
                                                  and answers[i][0]["exit_layer"] == expected[name][i]["exit_layer"]
                                                  for i in answers)
                    res["mean_exit_layer"] = float(np.mean([answers[i][0]["exit_layer"] for i in answers]))
                    runs[name].append(res)
            for name, done in runs.items():
                mid = sorted(done, key=lambda r: r["texts_per_s"])[len(done) // 2]  # the median round
                rows.append({"clients": clients, "policy": name, **mid, "rounds": len(done),
                             "texts_per_s_rounds": [r["texts_per_s"] for r in done],
                             "complete": all(r["complete"] for r in done),
                             "equal_to_offline": min(r["equal_to_offline"] for r in done)})
                log(f"{clients} clients, {name}: {mid['texts_per_s']:.1f} texts/s (median of {len(done)}) "
                    f"p50 {mid['p50_s'] * 1000:.0f} ms")
        metrics = json.loads(urllib.request.urlopen(url + "/metrics", timeout=60).read())
    finally:
        shutdown()
    at_batch: dict[int, dict] = {}
    for clients in args.clients:
        e, n = (next(r for r in rows if r["clients"] == clients and r["policy"] == p) for p in ("exits", "never"))
        e["served_speedup"] = e["texts_per_s"] / n["texts_per_s"]
        e["of_offline"] = e["served_speedup"] / offline["speedup"]
        b = max(1, round((e["mean_batch_rows"] + n["mean_batch_rows"]) / 2))
        if b not in at_batch:
            at_batch[b] = offline_speedup(run, texts, policy, b, args.repeats)
            log(f"offline at batch {b}: speed-up {at_batch[b]['speedup']:.2f}")
        saved = at_batch[b]["never_s"] - at_batch[b]["exits_s"]
        e["ceiling"] = {"batch": b, "offline_speedup": at_batch[b]["speedup"], "model_s_saved": saved,
                        "ceiling_speedup": n["wall_s"] / max(n["wall_s"] - saved, 1e-9)}
        e["of_ceiling"] = e["served_speedup"] / e["ceiling"]["ceiling_speedup"]
    report = {"checkpoint": run, "policy": policy, "texts": len(texts), "threads": args.threads,
              "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms, "offline": offline,
              "rows": rows, "server_metrics": metrics}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
