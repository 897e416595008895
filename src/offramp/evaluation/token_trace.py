"""Token traces: what every generation exit policy reads, per decoded token and exit, stored once.

``collect_tokens`` runs the full model's own greedy continuation of each prompt once, teacher-forced
(one forward per sequence, all exits), and keeps per token and exit the signals the generation
policies read: the exit distribution's summaries (max_prob, entropy, margin, top1: the same
``distribution_stat`` the engine calls), the confidence classifier's probability and, on request,
the exit features; plus the full model's token. Only tokens the engine decodes layer by layer are
kept (the first new token comes from the prompt's forward pass, which always runs every layer).

``replay_tokens`` runs a policy's own ``decide`` over the trace with the same row removal as the
engine. With the exact ``catch_up`` cache, greedy decoding sees exactly these hidden states until a
token differs from the full model's, so on a trace the generated text equals the full model's
precisely when no replayed exit disagrees with it: the sequence-level risk that ``LearnThenTest``
certifies (``risk="sequence"``) is the realised one. ``sweep_tokens`` gives agreement with the
full model against mean exit layer and FLOPs, with the oracle (first exit that agrees).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from offramp.engines.rows import RunningRows
from offramp.evaluation.collect import TRACE_META, TRACE_TENSORS, ExitTrace, write_trace
from offramp.evaluation.sweep import NOT_SWEPT, SweepPoint, SweepResult
from offramp.flops import Shapes, decode_layer_flops
from offramp.policies import POLICIES, ExitPolicy, ExitSignals, ExitSpace, make_policy, require_signals
from offramp.policies.base import DISTRIBUTION_STATS, distribution_stat
from offramp.utils import load_safetensors, read_json, readable_dir
from offramp.utils import progress as bar

KIND = "tokens"
FULL = -1  # marks a row that reached no exit (never happens in a complete trace)


@dataclass
class TokenTrace:
    """Per decoded token (n) and exit (E): the signals of every generation policy.

    Attributes:
        stats: name -> (E, n): max_prob, entropy, margin (float32) and top1 (long) of each exit's
            LM distribution.
        confidence: (E, n) the confidence classifier's probability.
        final_top1: (n,) the full model's token (-1 where unknown: a trace recorded by the engine).
        sequence: (n,) which prompt each token belongs to (0-based).
        exit_layers: layers run before each exit; num_layers: of the backbone; vocab_size.
        hidden: (E, n, d) exit features, if collected (for saturation).
        step_flops: FLOPs of one decoding step's parts (``decode_step_flops``), if known.
        meta: free-form (model, prompts, source: "teacher_forced" | "engine").
    """

    stats: dict[str, Tensor]
    confidence: Tensor
    final_top1: Tensor
    sequence: Tensor
    exit_layers: list[int]
    num_layers: int
    vocab_size: int
    hidden: Tensor | None = None
    step_flops: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    @property
    def num_sequences(self) -> int:
        return int(self.sequence.max()) + 1 if self.sequence.numel() else 0

    def __len__(self) -> int:
        return int(self.sequence.numel())

    def space(self) -> ExitSpace:
        return ExitSpace(tuple(self.exit_layers), self.vocab_size, self.num_layers)

    def signals(self) -> set[str]:
        """The ``ExitSignals`` this trace supplies to a policy."""
        return {"logits", "confidence"} | ({"hidden"} if self.hidden is not None else set())

    def agree(self) -> Tensor:
        """(E, n) bool: the exit's token equals the full model's."""
        return self.stats["top1"] == self.final_top1[None, :]

    def save(self, directory: str | os.PathLike) -> None:
        """Write the trace folder atomically."""
        tensors = {f"stat.{k}": v.contiguous() for k, v in self.stats.items()}
        tensors.update(confidence=self.confidence.contiguous(), final_top1=self.final_top1.contiguous(),
                       sequence=self.sequence.contiguous())
        if self.hidden is not None:
            tensors["hidden"] = self.hidden.contiguous()
        write_trace(directory, tensors, {"kind": KIND, "exit_layers": self.exit_layers, "num_layers": self.num_layers,
                                         "vocab_size": self.vocab_size, "step_flops": self.step_flops,
                                         "meta": self.meta})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TokenTrace":
        directory = readable_dir(directory)
        fix = "collect it again (offramp collect --model ... --exits ...)"
        meta = read_json(directory / TRACE_META, "trace metadata", fix, {"meta": dict, "exit_layers": list})
        if meta.get("kind") != KIND:
            raise ValueError(f"{directory} is a classification trace, not a token trace; load it with ExitTrace.load")
        if not meta.get("complete"):
            raise ValueError(f"{directory} is an incomplete trace; {fix}")
        t = load_safetensors(directory / TRACE_TENSORS, "token trace", fix)
        need = ["confidence", "final_top1", "sequence"] + [f"stat.{k}" for k in DISTRIBUTION_STATS]
        missing = [k for k in need if k not in t]
        if missing:
            raise ValueError(f"{directory / TRACE_TENSORS} lacks {missing}; {fix}")
        try:
            layers, num_layers, vocab = [int(x) for x in meta["exit_layers"]], int(meta["num_layers"]), \
                int(meta["vocab_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{directory / TRACE_META}: exit_layers / num_layers / vocab_size missing ({e}); "
                             f"{fix}") from None
        n = t["sequence"].numel()
        for k, v in t.items():
            dim = 1 if k.startswith("stat.") or k in ("confidence", "hidden") else 0
            if v.shape[dim] != n or (dim == 1 and v.shape[0] != len(layers)):
                raise ValueError(f"{directory / TRACE_TENSORS}: '{k}' has shape {tuple(v.shape)}, expected "
                                 f"{len(layers)} exits x {n} tokens; {fix}")
        return cls(stats={k[5:]: v for k, v in t.items() if k.startswith("stat.")}, confidence=t["confidence"],
                   final_top1=t["final_top1"], sequence=t["sequence"], exit_layers=layers,
                   num_layers=num_layers, vocab_size=vocab, hidden=t.get("hidden"),
                   step_flops=meta.get("step_flops"), meta=meta.get("meta") or {})


def load_trace(directory: str | os.PathLike) -> Any:
    """An ``ExitTrace`` (classification) or a ``TokenTrace`` (generation), by what the folder holds."""
    folder = readable_dir(directory)
    meta_path = folder / TRACE_META
    if meta_path.is_file():
        meta = read_json(meta_path, "trace metadata", "collect it again (offramp collect)")
        if meta.get("kind") == KIND:
            return TokenTrace.load(folder)
    return ExitTrace.load(folder)


# ------------------------------------------------------------------------------------------ collect
@torch.no_grad()
def collect_tokens(model: Any, sequences: list[tuple[Tensor, int]], *, keep_hidden: bool = False,
                   progress: bool = False, meta: dict | None = None) -> TokenTrace:
    """A teacher-forced token trace of ``model`` (a ``DecoderExitModel``) on ``sequences``.

    Args:
        sequences: (token ids, index of the first new token) per prompt, e.g. from
            ``offramp.training.distill.greedy_continuations`` (the full model's own continuations).
        keep_hidden: also keep the (E, n, d) exit features (what saturation reads).
    """
    if not sequences:
        raise ValueError("no sequences to collect: give at least one prompt")
    model.eval()
    ad = model.adapter
    stats: dict[str, list[Tensor]] = {k: [] for k in DISTRIBUTION_STATS}
    conf, final, seq_of, hidden, contexts = [], [], [], [], []
    for s, (ids, first_new) in enumerate(bar(sequences, desc="token trace", unit="sequence", enabled=progress)):
        positions = torch.arange(first_new, ids.numel() - 1)  # decode steps: they predict ids[q + 1]
        if positions.numel() == 0:
            continue
        out = model(ids[None].to(ad.layer_device(0)))
        final.append(out.final_logits[0, positions].argmax(-1).cpu())
        per = {k: [] for k in DISTRIBUTION_STATS}
        for e, feats in enumerate(out.exit_features):
            f = feats[0, positions]  # (m, d)
            logits = ad.logits(f[:, None])[:, -1]  # (m, V): the engine's exit logits
            for k in DISTRIBUTION_STATS:
                per[k].append(distribution_stat(logits, k).cpu())
        for k in DISTRIBUTION_STATS:
            stats[k].append(torch.stack(per[k]))
        conf.append(torch.sigmoid(out.confidence_logits[0, positions]).T.float().cpu())  # (E, m)
        if keep_hidden:
            hidden.append(torch.stack([f[0, positions] for f in out.exit_features]).float().cpu())
        seq_of.append(torch.full((positions.numel(),), s, dtype=torch.long))
        contexts.append((positions + 1).float())
    if not seq_of:
        raise ValueError("no sequence has a token decoded after the first: generate at least 2 new tokens")
    ctx = torch.cat(contexts)
    return TokenTrace(stats={k: torch.cat(v, 1) for k, v in stats.items()}, confidence=torch.cat(conf, 1),
                      final_top1=torch.cat(final), sequence=torch.cat(seq_of),
                      exit_layers=list(model.exit_layers), num_layers=ad.num_layers, vocab_size=ad.vocab_size,
                      hidden=torch.cat(hidden, 1) if hidden else None,
                      step_flops=decode_step_flops(model, float(ctx.mean())),
                      meta={"source": "teacher_forced", **(meta or {})})


def decode_step_flops(model: Any, context: float) -> dict[str, Any]:
    """FLOPs of one decoding step's parts at a mean context of ``context`` tokens: per layer, per exit
    head (features + confidence classifier) and one full-vocabulary LM head (final norm included)."""
    shapes = Shapes.from_config(model.backbone.config)
    heads = [2 * sum(p.numel() for p in h.parameters()) + 2 * sum(p.numel() for p in c.parameters())
             for h, c in zip(model.heads, model.confidence)]
    return {"layer": decode_layer_flops(shapes, context), "exit_heads": [float(x) for x in heads],
            "lm_head": float(2 * shapes.hidden * model.adapter.vocab_size), "context": context}


# ------------------------------------------------------------------------------------------ replay
def replay_tokens(policy: ExitPolicy | str | dict, trace: TokenTrace) -> Tensor:
    """(n,) exit index of every token under ``policy``: 0..E-1, or E for the full model.

    The same ``decide`` calls as the generate engine: the state starts once per token and follows it
    across its exits; tokens that exit leave the running set.
    """
    policy = make_policy(policy)
    require_signals(policy, trace.signals(), "this token trace",
                    "collect it with keep_hidden=True for saturation, or choose another policy")
    policy.check_exits(trace.exit_layers)
    n, e = len(trace), trace.num_exits
    out = torch.full((n,), e, dtype=torch.long)
    if policy.type == "never":
        return out
    running = RunningRows(n)
    carried = {"state": policy.start(n, e)}
    for k in range(e):
        rows = running.index
        sig = ExitSignals(layer=trace.exit_layers[k], confidence=trace.confidence[k, rows],
                          stats={name: v[k, rows] for name, v in trace.stats.items()},
                          hidden=trace.hidden[k, rows] if trace.hidden is not None else None)
        exits, carried["state"] = policy.decide(k, sig, carried["state"])
        carried = running.leave(exits, lambda local, original, k=k: out.index_fill_(0, original, k), carried)
        if not len(running):
            break
    return out


def taken_tokens(trace: TokenTrace, exit_index: Tensor) -> Tensor:
    """(n,) the token each row emits when it leaves at ``exit_index`` (E = the full model's)."""
    e = trace.num_exits
    at = exit_index.clamp(max=e - 1)
    exit_tok = trace.stats["top1"][at, torch.arange(len(trace))]
    return torch.where(exit_index >= e, trace.final_top1, exit_tok)


def sequence_disagreement(trace: TokenTrace, exit_index: Tensor) -> np.ndarray:
    """(S,) share of each sequence's decoded tokens whose exit disagrees with the full model."""
    wrong = (taken_tokens(trace, exit_index) != trace.final_top1).double()
    s = trace.num_sequences
    count = torch.bincount(trace.sequence, minlength=s).double()
    total = torch.bincount(trace.sequence, weights=wrong, minlength=s)
    return (total / count.clamp_min(1)).numpy()


def token_flops(trace: TokenTrace, exit_index: Tensor, reads_logits: bool, heads: bool = True) -> np.ndarray | None:
    """(n,) FLOPs of each token's decoding step at ``exit_index`` (None without a FLOPs count);
    ``heads=False``: the plain model (the never policy runs no exit head)."""
    f = trace.step_flops
    if not f:
        return None
    layers = np.asarray(trace.exit_layers + [trace.num_layers], dtype=np.float64)
    heads_cost = np.cumsum([0.0] + list(f["exit_heads"])) * float(heads)  # heads run before leaving at exit i
    idx = exit_index.numpy()
    passed = np.minimum(idx + 1, trace.num_exits)  # exits a token ran: through its own, or all
    cost = layers[idx] * f["layer"] + heads_cost[passed] + f["lm_head"]
    if reads_logits:
        cost = cost + f["lm_head"] * (passed - (idx < trace.num_exits))  # projections at exits not taken
    return cost


# ------------------------------------------------------------------------------------------ sweep
def _point(rule: str, policy: dict, param: str | None, value: Any, trace: TokenTrace, idx: Tensor,
           reads_logits: bool, heads: bool = True):
    layers = np.asarray(trace.exit_layers + [trace.num_layers], dtype=np.float64)
    agree = float((taken_tokens(trace, idx) == trace.final_top1).double().mean())
    mean_layer = float(layers[idx.numpy()].mean())
    flops = token_flops(trace, idx, reads_logits, heads)
    full = None if not trace.step_flops else trace.num_layers * trace.step_flops["layer"] + trace.step_flops["lm_head"]
    mean_flops = None if flops is None else float(flops.mean())
    return SweepPoint(rule, policy, param, value, agree, mean_layer, mean_flops,
                      trace.num_layers / mean_layer, None if full is None else full / mean_flops,
                      np.bincount(idx.numpy(), minlength=trace.num_exits + 1).tolist())


def sweep_tokens(trace: TokenTrace, rules: Any = None, *, grids: dict | None = None):
    """Every generation rule over its grid on a token trace: agreement with the full model vs mean
    exit layer and FLOPs per decoded token, with the full model and the oracle (first exit that
    agrees). The metric is token agreement; ``exit_counts`` has E + 1 entries (last: full model)."""
    if rules is None:
        rules = [name for name, cls in POLICIES.items() if name not in NOT_SWEPT and set(cls.needs) <= trace.signals()]
    named = dict(rules) if isinstance(rules, dict) else {r: r for r in rules}
    grids = dict(grids or {})
    points = []
    for rule, spec in named.items():
        spec = {"type": spec} if isinstance(spec, str) else dict(spec)
        kind = spec.pop("type")
        base = make_policy(kind, **spec)
        require_signals(base, trace.signals(), "this token trace")
        grid = grids.get(rule, grids.get(kind))
        settings = [(base, None)]
        if base.threshold_field is not None:
            settings = []
            for v in (list(grid) if grid is not None else base.sweep_grid(trace.space())):
                v = v.item() if isinstance(v, np.generic) else v
                try:
                    settings.append((base.with_threshold(v), v))
                except ValueError as err:
                    if grid is not None:
                        raise ValueError(f"grid value {v!r} for rule {rule!r}: {err}") from None
        for pol, v in settings:
            points.append(_point(rule, pol.to_dict(), base.threshold_field, v, trace, replay_tokens(pol, trace),
                                 "logits" in pol.needs))
    e = trace.num_exits
    full = _point("full", {}, None, None, trace, torch.full((len(trace),), e, dtype=torch.long), False, heads=False)
    agree = trace.agree()
    first = torch.where(agree.any(0), agree.double().argmax(0), torch.full_like(trace.sequence, e))
    oracle = _point("consistency oracle", {"type": "oracle", "mode": "consistent"}, None, None, trace, first, False)
    layers = list(trace.exit_layers) + [trace.num_layers]  # the last "exit" is the full model
    return SweepResult("agreement", trace.num_layers, layers, {r: full for r in named}, points, [oracle],
                       full.mean_flops)


# --------------------------------------------------------------------------------- engine recording
def engine_trace(output: Any) -> TokenTrace:
    """A token trace of what the generate engine itself saw (the ``GenerateOutput`` of
    ``generate(..., record_signals=True)``):
    per decoded token, the signals at every exit it reached (NaN / -1 past its exit). Replaying a
    policy over it must give the engine's own exits: the protocol check for any backbone and cache
    strategy, where a teacher-forced trace matches the engine only under an exact cache."""
    if "signals" not in output.extra:
        raise ValueError("the output holds no recorded signals: generate with record_signals=True")
    signals = output.extra["signals"]
    records, exit_layers = signals["records"], signals["exit_layers"]
    num_layers, vocab_size = signals["num_layers"], signals["vocab_size"]
    e = len(exit_layers)
    n = sum(r["rows"].numel() for r in records)
    stats = {k: torch.full((e, n), float("nan")) for k in ("max_prob", "entropy", "margin")}
    stats["top1"] = torch.full((e, n), FULL, dtype=torch.long)
    conf = torch.full((e, n), float("nan"))
    seq = torch.empty(n, dtype=torch.long)
    at = 0
    for r in records:  # one record per decoding step
        m = r["rows"].numel()
        seq[at:at + m] = r["rows"].cpu()
        for k, (local, values) in r["exits"].items():
            cols = at + local.cpu()
            conf[k, cols] = values["confidence"].float().cpu()
            for name in stats:
                stats[name][k, cols] = values[name].to(stats[name].dtype).cpu()
        at += m
    order = torch.argsort(seq, stable=True)  # sequence-major, decode order within a sequence
    return TokenTrace(stats={k: v[:, order] for k, v in stats.items()}, confidence=conf[:, order],
                      final_top1=torch.full((n,), FULL, dtype=torch.long), sequence=seq[order],
                      exit_layers=list(exit_layers), num_layers=num_layers, vocab_size=vocab_size,
                      meta={"source": "engine"})
