"""Serving a language model to OpenAI clients: continuous against static batching, exits against
the never-exit rule, at 1, 8 and 32 concurrent clients (CPU, offline, localhost).

Each client is the official ``openai`` Python client calling ``/v1/completions`` (one prompt per
request, held-out BBC News prompts in the chat template, ``--max-tokens`` new tokens, greedy),
streamed (``--stream``, the default: time to first token is measured) or not, one request at a
time; a run sends a bounded number of requests (``--requests-per-client`` each). Three servers
configurations run in the same process, on the same prompts:

- ``continuous`` with the checkpoint's exit policy (or ``--policy``), and with ``never``;
- ``static`` (``ServeOptions(batching="static")``, a batch runs until its last prompt ends: how
  ``/generate`` batched before) with the same exit policy.

Per configuration and concurrency: new tokens/s, p50 / p99 latency, p50 time to first token, and
``p50_over_single``: the p50 latency over the p50 latency of one client alone on the same server.
Every answer is compared with offline ``generate`` of its prompt alone (``equal_to_offline`` counts
the equal ones). What bounds ``p50_over_single`` on this machine: a step of b rows costs more than a
step of one (``offline_step_s``, plain decoding at each client count's batch size), so a request
among b others cannot be faster than ``bound_p50_over_single`` = step(b) / step(1) times its time
alone; ``of_possible`` = bound / measured. Results: JSON on stdout and in ``--out``.

Example: ``python benchmarks/serve_openai.py --checkpoint exits/smollm2 --out
benchmarks/results/serve_openai.json`` (the token exits of docs/generation.md).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_answers(run: str, prompts: list[str], policies: dict[str, dict], max_tokens: int) -> dict[str, list[str]]:
    """The text of each prompt generated alone, per policy (what the server must answer)."""
    from offramp.data.prompts import chat_texts
    from offramp.engines.generate import generate
    from offramp.modeling.causal_lm import load_exits_and_lm

    model, tok = load_exits_and_lm(run)
    model.eval()
    out: dict[str, list[str]] = {}
    for name, spec in policies.items():
        texts = []
        for text in chat_texts(tok, prompts):
            enc = tok([text], return_tensors="pt")
            res = generate(model, enc["input_ids"], enc["attention_mask"], policy=spec,
                           cache_strategy=model.config.cache_strategy, max_new_tokens=max_tokens)
            keep = res.exit_layers[0] > 0
            texts.append(tok.decode(res.new_tokens[0][keep].tolist(), skip_special_tokens=True))
        out[name] = texts
        log(f"offline answers ({name}) computed")
    return out


def step_times(run: str, prompts: list[str], sizes: list[int], max_tokens: int) -> dict[int, float]:
    """Seconds per decoding step of plain greedy decoding (the never rule) at each batch size, offline:
    what bounds a served request's latency when that many decode together (a row's tokens come one
    step at a time, and a step of b rows costs step(b))."""
    from offramp.data.prompts import chat_texts
    from offramp.engines.generate import SamplingOptions, generate
    from offramp.modeling.causal_lm import load_exits_and_lm

    model, tok = load_exits_and_lm(run)
    model.eval()
    tok.padding_side = "left"
    texts = chat_texts(tok, prompts)
    no_eos = SamplingOptions(eos_token_id=None, pad_token_id=tok.pad_token_id)
    out = {}
    for b in sizes:
        batch = (texts * (b // len(texts) + 1))[:b]
        enc = tok(batch, return_tensors="pt", padding=True)
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            generate(model, enc["input_ids"], enc["attention_mask"], policy="never", max_new_tokens=max_tokens,
                     sampling=no_eos)
            runs.append((time.perf_counter() - t0) / max_tokens)
        out[b] = min(runs)
        log(f"offline: {out[b] * 1000:.0f} ms per step at batch {b}")
    return out


def drive(url: str, model: str, prompts: list[str], clients: int, per_client: int, policy: str, max_tokens: int,
          stream: bool) -> dict:
    """``clients`` openai clients, each sending ``per_client`` requests one after the other."""
    from openai import OpenAI

    lock = threading.Lock()
    rows: list[dict] = []

    def client(k: int) -> None:
        api = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)
        for j in range(per_client):
            i = (k * per_client + j) % len(prompts)
            t0, first = time.perf_counter(), None
            kwargs = {"model": model, "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": max_tokens,
                      "extra_body": {"offramp": {"policy": policy}}}
            if stream:
                text, tokens = [], 0
                for c in api.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
                    if c.choices and c.choices[0].delta.content:
                        first = first or time.perf_counter() - t0
                        text.append(c.choices[0].delta.content)
                    if c.usage is not None:
                        tokens = c.usage.completion_tokens
                answer = "".join(text)
            else:
                out = api.chat.completions.create(**kwargs)
                answer, tokens = out.choices[0].message.content, out.usage.completion_tokens
            with lock:
                rows.append({"prompt": i, "text": answer, "tokens": tokens, "latency_s": time.perf_counter() - t0,
                             "ttft_s": first})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array([r["latency_s"] for r in rows])
    ttft = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in rows)
    return {"clients": clients, "requests": len(rows), "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
            "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else None, "answers": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a token-exits folder (offramp fit-exits)")
    ap.add_argument("--policy", default=None, help="the exit rule (JSON); default: the checkpoint's")
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts (held-out BBC News)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=2, help="(one client alone: 4x as many)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the replica")
    ap.add_argument("--no-stream", dest="stream", action="store_false")
    ap.add_argument("--out", default="benchmarks/results/serve_openai.json")
    args = ap.parse_args(argv)

    from offramp.config import DecoderExitConfig
    from offramp.data.assets import bbc_prompts
    from offramp.serving.app import ServeOptions, serve_checkpoint, shutdown
    from offramp.utils import atomic_write_json, read_json

    stored = read_json(Path(args.checkpoint) / "offramp_config.json", "token exits", "fit them again")
    policy = json.loads(args.policy) if args.policy else DecoderExitConfig.from_dict(stored).policy
    policies = {"exits": policy, "never": {"type": "never"}}
    prompts = bbc_prompts(args.prompts, split="test", instruct=True)
    expected = offline_answers(args.checkpoint, prompts, policies, args.max_tokens)
    rows = []
    for batching, names in (("continuous", ("exits", "never")), ("static", ("exits",))):
        opts = ServeOptions(max_batch_size=args.max_batch_size, max_texts=64, threads=args.threads,
                            policies=policies, batching=batching)
        url = serve_checkpoint(args.checkpoint, opts, port=free_port(), blocking=False)
        try:
            drive(url, args.checkpoint, prompts[:1], 1, 1, "never", 4, args.stream)  # warm-up
            for clients in args.clients:
                for name in names:
                    per = args.requests_per_client * (4 if clients == 1 else 1)
                    res = drive(url, args.checkpoint, prompts, clients, per, name, args.max_tokens, args.stream)
                    answers = res.pop("answers")
                    res["equal_to_offline"] = sum(a["text"] == expected[name][a["prompt"]] for a in answers)
                    rows.append({"batching": batching, "policy": name, **res})
                    log(f"{batching} {name} {clients} clients: {res['tokens_per_s']:.1f} tokens/s, p50 "
                        f"{res['p50_s']:.2f} s, ttft {res['ttft_p50_s'] or 0:.2f} s, {res['equal_to_offline']}/"
                        f"{res['requests']} equal to offline")
        finally:
            shutdown()
    steps = step_times(args.checkpoint, prompts, sorted(set(args.clients) | {1}), args.max_tokens)
    for row in rows:
        single = next(r for r in rows if r["batching"] == row["batching"] and r["policy"] == row["policy"]
                      and r["clients"] == 1)
        row["p50_over_single"] = row["p50_s"] / single["p50_s"]
        # the bound: every client's row decoding in one batch of `clients` rows, each step at step(clients)
        bound = steps[row["clients"]] / steps[1]
        row["bound_p50_over_single"] = bound
        row["of_possible"] = bound / row["p50_over_single"]
    for row in rows:
        if row["batching"] == "continuous":
            static = next((r for r in rows if r["batching"] == "static" and r["policy"] == row["policy"]
                           and r["clients"] == row["clients"]), None)
            never = next(r for r in rows if r["batching"] == "continuous" and r["policy"] == "never"
                         and r["clients"] == row["clients"])
            row["throughput_over_static"] = None if static is None else row["tokens_per_s"] / static["tokens_per_s"]
            row["throughput_over_never"] = row["tokens_per_s"] / never["tokens_per_s"]
    report = {"checkpoint": args.checkpoint, "policy": policy, "prompts": len(prompts), "max_tokens": args.max_tokens,
              "stream": args.stream, "threads": args.threads, "max_batch_size": args.max_batch_size,
              "client": "openai", "offline_step_s": {str(b): v for b, v in steps.items()}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
