"""What a schedule of token exits realises in offramp's engine, against its ideal and plain `generate`.

An oracle ceiling (``trained_exits.py``'s ``oracle_ceiling``) prices a token that leaves after k
layers at k layers + the LM head, as if the layers it skips cost nothing later. Under the exact
cache (``catch_up``) they do: a later token that goes deeper runs them for the pending tokens
beside its own. What that costs does not depend on the weights, only on the architecture and on
where tokens leave, so it is measured here on any model of the same architecture (default: the
offline SmolLM2-135M, the architecture of the continued-trained SmolLM2 of
``studies/trained_exits_smollm2.md``).

Each schedule is a distribution of exit depths (``layer:share``, the share of tokens leaving at
the first exit at or after that layer; the model's depth = never exits). Tokens take depths drawn
from it (seeded), step after step, through a policy that follows the schedule (``ScheduledExits``,
analysis only: it needs no signal, so exit decisions are free, as in the oracle). Per schedule
and cache strategy (batch 1, EOS off so every method emits ``--new-tokens``):

- ``ratio``: tokens/s against plain HF ``generate`` of the same weights (interleaved repeats);
- ``ideal``: the ideal ratio of the depths the engine took, over a full step (k layers + the
  head per token; costs timed here as in ``oracle_ceiling``); ``of_ideal``: the engine's ratio
  over its never-exit ratio, divided by the ideal: what the cache strategy and the engine keep;
- ``mean_exit_layer``: of the tokens after each row's first (which comes from the prompt's pass).

Multiply an oracle's ideal ratio by ``of_ideal`` (and by the never-exit ratio) for the most a rule
on those exits can realise with that cache. The agreement of the tokens here means nothing (the
exits of a model not trained for them); it is the trained model's oracle that fixes the schedule.

    python benchmarks/exit_schedule.py --json benchmarks/results/exit_schedule_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_speed import interleaved
from offramp.data.assets import bbc_prompts
from offramp.engines.generate import SamplingOptions, generate
from offramp.engines.generate.plan import median_seconds
from offramp.modeling import DecoderExitModel
from offramp.modeling.causal_lm import load_causal_lm
from offramp.policies.base import ExitPolicy, ExitSignals, PolicyState
from offramp.utils import atomic_write_json

# the oracle of the two-phase SmolLM2 at 0.90 agreement left at a mean layer of 18.2 (exits 8 ... 27):
# two shapes with that mean, tokens spread over the exits, and all-or-nothing
DEFAULT_SCHEDULES = ("8:0.31,12:0.12,15:0.05,18:0.05,21:0.08,24:0.08,27:0.10,30:0.21",
                     "8:0.536,30:0.464")


@dataclass(frozen=True)
class ScheduledExits(ExitPolicy):
    """Analysis only: decoding step i's tokens leave at the first exit at or after ``depths[i]``
    (cycling). The engine starts a policy's state once per step, which advances the schedule."""

    type = "scheduled"
    depths: tuple[int, ...] = (1,)
    _step: list = field(default_factory=lambda: [-1], compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.depths or any(not isinstance(d, int) or d < 1 for d in self.depths):
            raise ValueError(f"scheduled exits: depths must be layers >= 1, got {self.depths!r}")

    def start(self, batch_size: int, num_exits: int, device: torch.device | str = "cpu") -> PolicyState:
        self._step[0] += 1
        return super().start(batch_size, num_exits, device)

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        depth = self.depths[self._step[0] % len(self.depths)]
        return torch.full((signals.batch_size,), signals.layer >= depth, dtype=torch.bool,
                          device=signals.device), state


def parse_schedule(text: str, exit_layers: list[int], num_layers: int) -> dict[int, float]:
    """``layer:share,...`` -> {depth: share}; each layer an exit or the model's depth, shares summing to 1."""
    out: dict[int, float] = {}
    for part in text.split(","):
        layer, _, share = part.partition(":")
        try:
            k, s = int(layer), float(share)
        except ValueError:
            raise ValueError(f"schedule {text!r}: write it as layer:share,... (e.g. 8:0.5,30:0.5)") from None
        if k not in (*exit_layers, num_layers) or s < 0:
            raise ValueError(f"schedule {text!r}: layer {k} is not an exit ({exit_layers}) or the model's depth "
                             f"({num_layers}), or its share is negative")
        out[k] = out.get(k, 0.0) + s
    if abs(sum(out.values()) - 1) > 1e-6:
        raise ValueError(f"schedule {text!r}: shares sum to {sum(out.values()):.3f}, not 1")
    return out


def draw_depths(schedule: dict[int, float], n: int, seed: int) -> tuple[int, ...]:
    """``n`` depths drawn from the schedule (seeded)."""
    rng = random.Random(seed)
    layers = sorted(schedule)
    return tuple(rng.choices(layers, weights=[schedule[k] for k in layers], k=n))


def ideal_ratio(depths: tuple[int, ...], layer_s: float, head_s: float, num_layers: int) -> float:
    """A full step over the mean cost of a token leaving after its depth (k layers + the head)."""
    mean = sum(k * layer_s + head_s for k in depths) / len(depths)
    return (num_layers * layer_s + head_s) / mean


def step_costs(backbone, adapter, one: dict) -> tuple[float, float]:
    """(a layer, the LM head) in seconds at batch 1, as ``oracle_ceiling`` times them."""
    step_s = (median_seconds(lambda: generate(backbone, one["input_ids"], one["attention_mask"], max_new_tokens=17))
              - median_seconds(lambda: generate(backbone, one["input_ids"], one["attention_mask"],
                                                max_new_tokens=1))) / 16
    h = torch.zeros(1, 1, adapter.hidden_size, dtype=adapter.dtype)
    head_s = median_seconds(lambda: adapter.logits(h))
    return (step_s - head_s) / adapter.num_layers, head_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--model", default="smollm2-offline")
    p.add_argument("--exit-layers", default="8,12,15,18,21,24,27")
    p.add_argument("--schedules", nargs="+", default=list(DEFAULT_SCHEDULES),
                   help="each a distribution of exit depths, layer:share,... (the model's depth: never exits)")
    p.add_argument("--cache-strategies", default="catch_up,copy_kv,propagate")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    backbone, tok = load_causal_lm(args.model)
    L = backbone.config.num_hidden_layers
    exit_layers = [int(x) for x in args.exit_layers.split(",")]
    schedules = {s: parse_schedule(s, exit_layers, L) for s in args.schedules}  # refused before any work
    exits = DecoderExitModel.from_backbone(backbone, exit_layers=exit_layers, head="tied")
    strategies = [x for x in args.cache_strategies.split(",") if x]
    new = args.new_tokens
    sampling = SamplingOptions(eos_token_id=None, pad_token_id=tok.pad_token_id or 0)
    prompts = bbc_prompts(args.prompts, split="test", instruct=False, words=24, skip=args.prompts)
    batches = [tok([t], return_tensors="pt") for t in prompts]
    layer_s, head_s = step_costs(backbone, exits.adapter, batches[0])
    log(f"a layer {layer_s * 1e3:.2f} ms, the LM head {head_s * 1e3:.2f} ms")

    methods = {"hf_generate": lambda b: backbone.generate(**b, do_sample=False, max_new_tokens=new,
                                                          min_new_tokens=new, pad_token_id=tok.pad_token_id),
               "offramp_never_exit": lambda b: generate(backbone, b["input_ids"], b["attention_mask"],
                                                        max_new_tokens=new, sampling=sampling)}
    depths = {s: draw_depths(schedules[s], 4096, args.seed) for s in schedules}
    policies = {}
    for s in schedules:
        for x in strategies:
            policies[f"{s}/{x}"] = ScheduledExits(depths=depths[s])
            methods[f"{s}/{x}"] = lambda b, s=s, x=x: generate(exits, b["input_ids"], b["attention_mask"],
                                                               policy=policies[f"{s}/{x}"], cache_strategy=x,
                                                               max_new_tokens=new, sampling=sampling)
    for fn in methods.values():
        fn(batches[0])  # warm-up
    times, res = interleaved(methods, batches, args.repeats, log, label="  ")
    secs = {m: statistics.median(t) for m, t in times.items()}
    base = secs["hf_generate"]
    never = base / secs["offramp_never_exit"]
    rows = {"hf_generate": {"ratio": 1.0}, "offramp_never_exit": {"ratio": round(never, 3)}}
    for s, shares in schedules.items():
        for x in strategies:
            name = f"{s}/{x}"
            # the depths the engine took (the first token of a row comes from the prompt's pass)
            taken = [int(k) for out in res[name] for k in out.exit_layers[:, 1:].flatten()]
            ideal = ideal_ratio(tuple(taken), layer_s, head_s, L)
            ratio = base / secs[name]
            rows[name] = {"schedule": s, "cache_strategy": x, "ratio": round(ratio, 3),
                          "mean_exit_layer": round(sum(taken) / len(taken), 2),
                          "scheduled_mean": round(sum(k * w for k, w in shares.items()), 2),
                          "ideal": round(ideal, 3), "of_ideal": round(ratio / never / ideal, 3)}
            log(f"{name}: {ratio:.3f}x plain generate, ideal {ideal:.3f}x, {rows[name]['of_ideal']:.3f} of it")
    result = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
              "costs": {"layer_ms": round(layer_s * 1e3, 3), "head_ms": round(head_s * 1e3, 3), "layers": L},
              "rows": rows}
    atomic_write_json(args.json, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
