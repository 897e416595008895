"""``offramp serve``: early exits behind HTTP endpoints (Ray Serve, dynamic batching).

A classifier (``offramp train`` output) is served at /classify, a token-exits folder at /generate,
a LYNX probe (``offramp reason fit`` output, with the model it was fitted on) at /reason; one
server takes one checkpoint of each kind. Language models also answer the OpenAI API
(/v1/models, /v1/completions, /v1/chat/completions), in continuously refilled batches.

```
offramp serve runs/minilm-pabee --port 8000 --replicas 2 --max-batch-size 32
curl -s localhost:8000/classify -H 'content-type: application/json' -d '{"texts": ["great game!"]}'
offramp serve exits/smollm2 runs/probe-offline --dtype auto   # /v1/chat/completions, /generate, /reason
```
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from offramp.cli import common


def add_serve_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve checkpoints over HTTP with per-row early exits",
                              description=common.help_text(__doc__))
    p.add_argument("checkpoint", nargs="+", help="an `offramp train` output folder (/classify), a token-exits "
                   "folder (/generate) or a probe folder of `offramp reason fit` (/reason); one of each kind")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="model copies, each in its own process (default 1)")
    p.add_argument("--max-batch-size", type=int, default=32, help="texts per early-exit batch; for language "
                   "models, the most prompts (chains) in the running batch (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a classification batch waits for more texts (default 5 ms; generation and "
                        "reasoning batch continuously: a request joins at the next step)")
    p.add_argument("--max-texts", type=int, default=64, help="texts one request may send (default 64)")
    p.add_argument("--replica-threads", type=int, default=1, help="torch threads per replica (default 1)")
    p.add_argument("--policies", default=None, help='named policies requests may choose, as JSON: '
                   '\'{"fast": {"type": "entropy", "threshold": 0.5}}\' (every policy type is also accepted by name)')
    p.add_argument("--model", default=None, help="the LM to load for the token-exits or probe folder instead of "
                   "the one it names (a folder, Hub id or offline alias; applies to both when both are served)")
    common.add_device_args(p, dtype_help="the served models' dtype")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default length of a generation (64) or "
                   "of a chain of thought (the probe's setting); requests may ask for their own")
    p.add_argument("--address", default=None, help="join a running Ray cluster (e.g. auto or HOST:6379) to "
                   "place replicas on its machines; default: a local Ray")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    common.require_min(args, port=1, replicas=1, max_batch_size=1, max_texts=1, replica_threads=1)
    if args.max_new_tokens is not None:
        common.require_min(args, max_new_tokens=1)
    if args.port > 65535:
        raise ValueError(f"--port must be <= 65535, got {args.port}")
    policies: dict[str, Any] = {}
    if args.policies:
        try:
            policies = json.loads(args.policies)
        except json.JSONDecodeError as e:
            raise ValueError(f"--policies is not valid JSON: {e}") from None
        if not isinstance(policies, dict) or not all(isinstance(v, dict) for v in policies.values()):
            raise ValueError('--policies must map names to policy objects: \'{"fast": {"type": "entropy"}}\'')
        from offramp.policies import make_policy

        for name, spec in policies.items():
            try:
                make_policy(spec)
            except ValueError as e:
                raise ValueError(f"--policies {name!r}: {e}") from None
    from offramp.serving.app import check_checkpoints, check_port_free, local_ray_on_loopback

    served = check_checkpoints(args.checkpoint)
    common.chosen_device(args, "serve")  # a missing GPU is an error before Ray starts
    check_port_free(args.host, args.port)
    if args.address is None:
        local_ray_on_loopback()  # before ray is imported
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise ValueError('serving needs Ray Serve: pip install "offramp[serve]"') from None
    from offramp.serving.app import ROUTES, ServeOptions, serve_checkpoint

    opts = ServeOptions(replicas=args.replicas, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                        max_texts=args.max_texts, threads=args.replica_threads, policies=policies,
                        max_new_tokens=args.max_new_tokens, model=args.model, dtype=args.dtype,
                        device=args.device)
    where = ", ".join(f"{c} at {ROUTES[k]}" for k, c in served.items())
    common.log(f"starting Ray Serve for {where} on http://{args.host}:{args.port} ({args.replicas} replica(s))")
    serve_checkpoint(args.checkpoint, opts, host=args.host, port=args.port, address=args.address,
                     ready=lambda url: common.log(f"serving at {url}: it answers now; Ctrl-C stops it (requests in "
                                                  "flight finish first)"))
    print(json.dumps({"stopped": True}), file=sys.stdout)
    return 0
