"""A bounded load test of ``offramp serve`` on localhost: throughput and latency with exits against
the same server with the never-exit rule, at several numbers of concurrent clients, and the
offline batch speed-up of the same rule on the same inputs (CPU, offline).

``--endpoint classify`` (default): each client sends one text per request to /classify; every
answer is checked against offline ``predict`` (same label and exit). ``--endpoint generate``: one
prompt per request to /generate (held-out BBC News prompts, chat template, --max-new-tokens);
every answer is compared with offline ``generate`` of that prompt alone (same tokens and exits;
a batch's arithmetic may rarely flip a near-tie, so this one is counted, not required). Throughput
is texts/s for classification and new tokens/s for generation.

Clients send one request at a time, over one kept-alive connection each; none may be lost or
duplicated. The served speed-up is throughput(exits) / throughput(never) at each concurrency;
``of_offline`` divides it by the offline speed-up of early exit on batches of --max-batch-size.

The ceiling: the server adds a cost per request (HTTP, the proxy, Ray's hop to the replica,
JSON) that exits cannot shorten. At each concurrency the replica's batches are counted (``/metrics``
before and after the run), the offline model time of exits and never-exit is measured at that
mean batch size, and ``ceiling_speedup = wall(never) / (wall(never) - model time exits save)``:
the served speed-up if exits saved their full offline time and the server nothing else.
``of_ceiling`` is the measured served speed-up as a fraction of it.

Examples: ``python benchmarks/serve_load.py --texts 256 --clients 1 8 32``; ``python
benchmarks/serve_load.py --endpoint generate --texts 32 --max-new-tokens 32 --out
benchmarks/results/serve_load_generate.json``. Without --checkpoint, classification trains a small
MiniLM checkpoint on the offline tweets once (into ~/.cache/offramp/serve-bench) and generation
uses SmolLM2's FFN exits of benchmarks/generate_speed.py (``--train-only`` trains them).
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


def checkpoint(path: str | None, endpoint: str) -> str:
    if path:
        return path
    if endpoint == "generate":
        out = CACHE / "exits" / "smollm2-ffn"
        if not (out / "offramp_config.json").is_file():
            raise SystemExit(f"no token exits at {out}: run python benchmarks/generate_speed.py --train-only "
                             "(or pass --checkpoint EXITS)")
        return str(out)
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


class Classify:
    """/classify with one text per request; the unit of throughput is a text."""

    route, unit = "/classify", "texts"

    def __init__(self, run: str, n: int, policy: dict, args: argparse.Namespace) -> None:
        from offramp import EarlyExitModel
        from offramp.data import load_data
        from offramp.modeling.predict import predict_rows, tokenizer_of
        from offramp.policies import make_policy
        from offramp.utils import checkpoint_dir

        self.inputs = list(load_data("tweets", max_eval=n).test.texts[:n])
        self.policy, self.policies = policy, {"exits": policy, "never": {"type": "never"}}
        self.model = EarlyExitModel.from_pretrained(checkpoint_dir(run)).eval()
        self.tok = tokenizer_of(self.model)
        self.expected = {name: list(predict_rows(self.model, self.inputs, make_policy(spec), max_length=64))
                         for name, spec in self.policies.items()}

    def body(self, i: int, policy: str) -> dict:
        return {"text": self.inputs[i], "policy": policy}

    def equal(self, answer: dict, policy: str, i: int) -> bool:
        want = self.expected[policy][i]
        return answer["label"] == want["label"] and answer["exit_layer"] == want["exit_layer"]

    def units(self, answer: dict) -> int:
        return 1

    def exit_layers(self, answer: dict) -> list[int]:
        return [answer["exit_layer"]]

    def offline(self, batch: int, repeats: int) -> dict:
        import torch

        from offramp.data.batching import encode_texts
        from offramp.policies import make_policy

        encs = [encode_texts(self.inputs[i:i + batch], self.tok, max_length=64)
                for i in range(0, len(self.inputs), batch)]
        times = {}
        for name, spec in self.policies.items():
            pol, runs = make_policy(spec), []
            for _ in range(repeats):
                t0 = time.perf_counter()
                with torch.no_grad():
                    for enc in encs:
                        self.model.predict(enc["input_ids"], enc["attention_mask"], pol,
                                           token_type_ids=enc.get("token_type_ids"))
                runs.append(time.perf_counter() - t0)
            times[name] = float(np.median(runs))
        n = len(self.inputs)
        return {"batch": batch, "exits_s": times["exits"], "never_s": times["never"],
                "exits_s_per_unit": times["exits"] / n, "never_s_per_unit": times["never"] / n,
                "speedup": times["never"] / times["exits"]}


class Generate:
    """/generate with one prompt per request (chat template, greedy); the unit is a new token."""

    route, unit = "/generate", "tokens"

    def __init__(self, run: str, n: int, policy: dict, args: argparse.Namespace) -> None:
        from offramp.data.assets import bbc_prompts
        from offramp.data.prompts import chat_texts
        from offramp.engines.generate import generate
        from offramp.modeling.causal_lm import load_exits_and_lm

        self.max_new = args.max_new_tokens
        self.model, self.tok = load_exits_and_lm(run)
        self.model.eval()
        self.inputs = bbc_prompts(n, split="test", instruct=True)
        self.chat = chat_texts(self.tok, self.inputs)
        self.policy, self.policies = policy, {"exits": policy, "never": {"type": "never"}}
        self.strategy = self.model.config.cache_strategy
        self.expected: dict[str, list[dict]] = {}
        for name, spec in self.policies.items():
            rows = []
            for text in self.chat:  # alone: the answer a request would get from a server with no other load
                enc = self.tok([text], return_tensors="pt")
                out = generate(self.model, enc["input_ids"], enc["attention_mask"], policy=spec,
                               cache_strategy=self.strategy, max_new_tokens=self.max_new)
                keep = out.exit_layers[0] > 0
                rows.append({"tokens": out.new_tokens[0][keep].tolist(),
                             "exit_layers": out.exit_layers[0][keep].tolist()})
            self.expected[name] = rows
            log(f"offline answers ({name}) computed")

    def body(self, i: int, policy: str) -> dict:
        return {"prompt": self.inputs[i], "policy": policy, "chat": True, "max_new_tokens": self.max_new}

    def equal(self, answer: dict, policy: str, i: int) -> bool:
        want = self.expected[policy][i]
        return answer["tokens"] == want["tokens"] and answer["exit_layers"] == want["exit_layers"]

    def units(self, answer: dict) -> int:
        return len(answer["tokens"])

    def exit_layers(self, answer: dict) -> list[int]:
        return answer["exit_layers"]

    def offline(self, batch: int, repeats: int) -> dict:
        from offramp.engines.generate import generate

        encs = [self.tok(self.chat[i:i + batch], return_tensors="pt", padding=True)
                for i in range(0, len(self.chat), batch)]
        times, tokens = {}, {}
        for name, spec in self.policies.items():
            runs = []
            for _ in range(repeats):
                t0, count = time.perf_counter(), 0
                for enc in encs:
                    out = generate(self.model, enc["input_ids"], enc["attention_mask"], policy=spec,
                                   cache_strategy=self.strategy, max_new_tokens=self.max_new)
                    count += int((out.exit_layers > 0).sum())
                runs.append(time.perf_counter() - t0)
            times[name], tokens[name] = float(np.median(runs)), count
        per = {name: times[name] / tokens[name] for name in times}
        return {"batch": batch, "exits_s": times["exits"], "never_s": times["never"], "exits_tokens": tokens["exits"],
                "never_tokens": tokens["never"], "exits_s_per_unit": per["exits"], "never_s_per_unit": per["never"],
                "speedup": per["never"] / per["exits"]}


def load(url: str, work, clients: int, policy: str) -> dict:
    import http.client
    from urllib.parse import urlparse

    answers: dict[int, list] = {}
    latencies: list[float] = []
    lock = threading.Lock()
    where = urlparse(url)
    n = len(work.inputs)

    def client(k: int) -> None:  # one kept-alive connection per client, as HTTP clients do
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=600)
        for i in range(k, n, clients):
            t0 = time.perf_counter()
            conn.request("POST", work.route, body=json.dumps(work.body(i, policy)),
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
    units = sum(work.units(a[0]) for a in answers.values())
    return {"wall_s": wall, "units": units, "units_per_s": units / wall, "requests_per_s": n / wall,
            "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)), "answers": answers}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", choices=["classify", "generate"], default="classify")
    ap.add_argument("--checkpoint", default=None, help="a classifier run (classify) or a token-exits folder (generate)")
    ap.add_argument("--policy", default=None, help="the exit rule (JSON); default: entropy 0.9 (classify), "
                    "token_confidence 0.8 (generate)")
    ap.add_argument("--texts", type=int, default=256, help="texts (classify) or prompts (generate) per run")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="generate: tokens per prompt")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the replica and the offline run")
    ap.add_argument("--repeats", type=int, default=3, help="offline timings (median)")
    ap.add_argument("--rounds", type=int, default=3, help="load runs per rule and concurrency, interleaved (median)")
    ap.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = ap.parse_args(argv)
    import torch

    from offramp.serving.app import ServeOptions, serve_checkpoint, shutdown
    from offramp.utils import atomic_write_json

    torch.set_num_threads(args.threads)
    run = checkpoint(args.checkpoint, args.endpoint)
    default = {"type": "entropy", "threshold": 0.9} if args.endpoint == "classify" else \
        {"type": "token_confidence", "threshold": 0.8}
    policy = json.loads(args.policy) if args.policy else default
    work = (Classify if args.endpoint == "classify" else Generate)(run, args.texts, policy, args)
    offline = work.offline(args.max_batch_size, args.repeats)
    log(f"offline batch speed-up {offline['speedup']:.2f}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = ServeOptions(max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_texts=64,
                        threads=args.threads, policies=dict(work.policies))
    url = serve_checkpoint(run, opts, port=port, blocking=False)
    rows = []
    try:
        post(url + work.route, work.body(0, "never"))  # warm-up
        for clients in args.clients:
            runs: dict[str, list[dict]] = {"exits": [], "never": []}
            for _ in range(args.rounds):  # interleaved: both rules share the machine's load
                for name in ("exits", "never"):
                    before = json.loads(urllib.request.urlopen(url + "/metrics", timeout=60).read())
                    res = load(url, work, clients, name)
                    after = json.loads(urllib.request.urlopen(url + "/metrics", timeout=60).read())
                    res["replica_batches"] = after["batches"] - before["batches"]
                    res["mean_batch_rows"] = (after["rows"] - before["rows"]) / max(res["replica_batches"], 1)
                    answers = res.pop("answers")
                    res["complete"] = sorted(answers) == list(range(len(work.inputs))) and all(
                        len(v) == 1 for v in answers.values())
                    res["equal_to_offline"] = sum(work.equal(answers[i][0], name, i) for i in answers)
                    layers = [x for i in answers for x in work.exit_layers(answers[i][0])]
                    res["mean_exit_layer"] = float(np.mean(layers))
                    runs[name].append(res)
            for name, done in runs.items():
                mid = sorted(done, key=lambda r: r["units_per_s"])[len(done) // 2]  # the median round
                rows.append({"clients": clients, "policy": name, **mid, "rounds": len(done),
                             "units_per_s_rounds": [r["units_per_s"] for r in done],
                             "complete": all(r["complete"] for r in done),
                             "equal_to_offline": min(r["equal_to_offline"] for r in done)})
                log(f"{clients} clients, {name}: {mid['units_per_s']:.1f} {work.unit}/s (median of {len(done)}) "
                    f"p50 {mid['p50_s'] * 1000:.0f} ms")
        metrics = json.loads(urllib.request.urlopen(url + "/metrics", timeout=60).read())
    finally:
        shutdown()
    at_batch: dict[int, dict] = {}
    for clients in args.clients:
        e, n = (next(r for r in rows if r["clients"] == clients and r["policy"] == p) for p in ("exits", "never"))
        e["served_speedup"] = e["units_per_s"] / n["units_per_s"]
        e["of_offline"] = e["served_speedup"] / offline["speedup"]
        b = max(1, round((e["mean_batch_rows"] + n["mean_batch_rows"]) / 2))
        if b not in at_batch:
            at_batch[b] = work.offline(b, args.repeats)
            log(f"offline at batch {b}: speed-up {at_batch[b]['speedup']:.2f}")
        # model time exits save on the never server's units, at the replica's mean batch
        saved = n["units"] * (at_batch[b]["never_s_per_unit"] - at_batch[b]["exits_s_per_unit"])
        ceiling = n["wall_s"] / (n["wall_s"] - saved) if saved < n["wall_s"] else None  # None: offline noise
        e["ceiling"] = {"batch": b, "offline_speedup": at_batch[b]["speedup"], "model_s_saved": saved,
                        "ceiling_speedup": ceiling}
        e["of_ceiling"] = None if ceiling is None else e["served_speedup"] / ceiling
    report = {"endpoint": args.endpoint, "unit": work.unit, "checkpoint": run, "policy": policy,
              "inputs": len(work.inputs), "threads": args.threads,
              **({"max_new_tokens": args.max_new_tokens} if args.endpoint == "generate" else {}),
              "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms, "offline": offline,
              "rows": rows, "server_metrics": metrics}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
