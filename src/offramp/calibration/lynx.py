"""The LYNX probe: an MLP on cue-event hidden states, wrapped in class-conditional split conformal.

``LynxProbe.fit`` standardises the features and trains an MLP (256, 64) with class-balanced
weights w_c = n / (2 n_c). ``calibrate`` fits class-conditional split conformal sets at level
delta on a disjoint calibration split (scores 1 - p_c, the exact finite-sample quantile, +inf
when too few points; ``offramp.calibration.conformal``). The exit rule accepts an event when its
prediction set is exactly {1}: then P(exit | the forced answer would be wrong) <= delta per event,
for events exchangeable with the calibration events.

A chain passes many cue events, so a per-event guarantee allows far more than delta premature
exits per chain. ``calibrate(..., per="chain", groups=...)`` gives the guarantee per chain
instead: each calibration chain scores the highest P(right) among its events whose forced answer
is wrong (-inf if none); Q is the conformal quantile of those scores; the rule exits at the first
event with P(right) > Q. Then P(the chain exits at an event whose forced answer is wrong) <= delta,
for chains exchangeable with the calibration chains (the CATs construction applied to chains).

That bound counts a stop as premature even in a chain whose full answer is wrong, where stopping
loses nothing; on a model that gets many problems wrong those chains set Q. ``risk="lost"``
bounds what a user loses instead: only chains whose full answer is right (``chain_right``) score
their highest P(right) at a wrong event, the others score -inf. Then P(the chain stops at a wrong
answer where its full chain would have been right) <= delta, so the expected accuracy lost to
stopping is at most delta (the guarantee zelt and the classifiers' ``wrong_when_full_right`` risk
state).
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from offramp.calibration.conformal import ClassConditionalConformal, conformal_quantile
from offramp.names import CHAIN_RISKS
from offramp.policies import ExitPolicy, make_policy
from offramp.policies.probe import ProbeExitPolicy
from offramp.utils import atomic_dir, load_torch_state, read_json, readable_dir

PROBE_FILE = "probe.json"
RISKS = CHAIN_RISKS
WEIGHTS_FILE = "probe.pt"


def _check_xy(features: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (n, d) array, got shape {x.shape}")
    if labels is None:
        return x, None
    y = np.asarray(labels).astype(np.int64).ravel()
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"features have {x.shape[0]} rows but labels {y.shape[0]}: pass one label per event")
    if y.size and (y.min() < 0 or y.max() > 1):
        raise ValueError(f"labels must be 0 (forced answer wrong) or 1 (right), got range [{y.min()}, {y.max()}]")
    return x, y


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Class weights w_c = n / (2 n_c) for binary labels; a ValueError if a class is missing."""
    counts = np.bincount(labels, minlength=2)
    if (counts == 0).any():
        raise ValueError(f"the probe needs events of both classes, got counts {counts.tolist()}: "
                         "label more problems")
    return labels.size / (2.0 * counts)


def first_exit(accepts: np.ndarray) -> int | None:
    """Index of the first accepted event of one chain (the exit rule), or None."""
    idx = np.flatnonzero(np.asarray(accepts, dtype=bool))
    return int(idx[0]) if idx.size else None


class LynxProbe:
    """MLP probe + conformal exit rule, scikit-learn style (``fit``, then ``calibrate``).

    Args:
        hidden: widths of the hidden layers.
        epochs: full-batch Adam steps.
        lr: learning rate.
        weight_decay: L2 penalty (AdamW).
        seed: seed of the initialisation.
    """

    def __init__(self, hidden: tuple[int, ...] = (256, 64), epochs: int = 300, lr: float = 1e-3,
                 weight_decay: float = 1e-2, seed: int = 0) -> None:
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden widths must be positive, got {hidden}")
        if epochs < 1 or lr <= 0:
            raise ValueError(f"need epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
        self.hidden, self.epochs, self.lr = tuple(hidden), epochs, lr
        self.weight_decay, self.seed = weight_decay, seed

    def _build(self, d: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for w in self.hidden:
            layers += [nn.Linear(d, w), nn.ReLU()]
            d = w
        layers.append(nn.Linear(d, 2))
        return nn.Sequential(*layers)

    def fit(self, features: np.ndarray, labels: np.ndarray) -> "LynxProbe":
        """Standardise, then train with class-balanced cross-entropy. Returns self."""
        x, y = _check_xy(features, labels)
        self.mean_ = x.mean(0)
        self.std_ = x.std(0) + 1e-6
        self.class_weights_ = balanced_weights(y)
        g = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            self.net_ = self._build(x.shape[1])
        xt = torch.from_numpy((x - self.mean_) / self.std_)  # (n, d)
        yt = torch.from_numpy(y)
        loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(self.class_weights_, dtype=torch.float32))
        opt = torch.optim.AdamW(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.net_.train()
        for _ in range(self.epochs):
            opt.zero_grad()
            loss = loss_fn(self.net_(xt), yt)
            loss.backward()
            opt.step()
        self.net_.eval()
        self.train_loss_ = float(loss.detach())
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(n, 2) probabilities [P(forced answer wrong), P(right)]."""
        if not hasattr(self, "net_"):
            raise ValueError("LynxProbe is not fitted: call fit(features, labels) first")
        x, _ = _check_xy(features)
        if x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"features have {x.shape[1]} columns, the probe was fitted on {self.mean_.shape[0]}: "
                             "use the same feature layers")
        with torch.no_grad():
            logits = self.net_(torch.from_numpy((x - self.mean_) / self.std_))  # (n, 2)
        return logits.double().softmax(-1).numpy()  # float64: no ties at exactly 0 or 1

    def calibrate(self, features: np.ndarray, labels: np.ndarray, delta: float, *, per: str = "event",
                  groups: np.ndarray | None = None, risk: str = "premature",
                  chain_right: np.ndarray | None = None) -> "LynxProbe":
        """A copy of this probe calibrated at level ``delta``.

        ``per="event"`` (LYNX): class-conditional conformal sets; exit where the set is exactly {1}.
        ``per="chain"``: ``groups`` (n,) names the chain of each event; exit where P(right) > Q,
        with P(premature exit) <= delta per chain; with ``risk="lost"`` and ``chain_right`` (n,),
        whether each event's chain ends right (``EventDataset.chain_right``), P(a right answer
        lost) <= delta per chain (see the module docstring).
        """
        x, y = _check_xy(features, labels)
        if per not in ("event", "chain"):
            raise ValueError(f"per must be 'event' or 'chain', got {per!r}")
        if risk not in RISKS:
            raise ValueError(f"risk must be one of {', '.join(RISKS)}, got {risk!r}")
        if risk == "lost" and per != "chain":
            raise ValueError("risk 'lost' is a per-chain risk: calibrate with per='chain' (--per chain)")
        out = copy.copy(self)
        out.conformal_ = ClassConditionalConformal(alpha=delta).fit(self.predict_proba(x), y)
        out.delta_, out.per_, out.risk_ = float(delta), per, risk
        if per == "chain":
            if groups is None or np.asarray(groups).shape != y.shape:
                raise ValueError("per='chain' needs groups: the chain (problem) index of each event, "
                                 "e.g. EventDataset.groups")
            g = np.asarray(groups)
            counts = y == 0  # the events whose stop counts against the chain
            if risk == "lost":
                if chain_right is None or np.asarray(chain_right).shape != y.shape:
                    raise ValueError("risk 'lost' needs chain_right: whether the full chain of each event "
                                     "answers right, e.g. EventDataset.chain_right")
                counts &= np.asarray(chain_right, dtype=bool)
            p1 = self.predict_proba(x)[:, 1]
            chains = np.unique(g)
            worst = [p1[(g == c) & counts].max(initial=-np.inf) for c in chains]
            out.chain_threshold_ = conformal_quantile(np.array(worst), delta)
            out.chain_count_ = int(chains.size)
        return out

    def prediction_sets(self, features: np.ndarray) -> np.ndarray:
        """(n, 2) bool: membership of class 0 (wrong) and 1 (right) in each prediction set."""
        if not hasattr(self, "conformal_"):
            raise ValueError("LynxProbe is not calibrated: call calibrate(features, labels, delta) first")
        return self.conformal_.predict_sets(self.predict_proba(features))

    def accepts(self, features: np.ndarray) -> np.ndarray:
        """(n,) bool: the exit rule (per event: the set is exactly {1}; per chain: P(right) > Q)."""
        if getattr(self, "per_", "event") == "chain":
            return self.predict_proba(features)[:, 1] > self.chain_threshold_
        sets = self.prediction_sets(features)
        return sets[:, 1] & ~sets[:, 0]

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write ``probe.json`` (settings, standardisation, quantiles, ``extra``) and ``probe.pt`` atomically.

        ``extra`` is any JSON-able dict kept with the probe (e.g. the ``ReasonConfig`` its features
        came from); ``load`` restores it as ``extra_``.
        """
        if not hasattr(self, "net_"):
            raise ValueError("LynxProbe is not fitted: nothing to save")
        meta = {"hidden": list(self.hidden), "epochs": self.epochs, "lr": self.lr,
                "weight_decay": self.weight_decay, "seed": self.seed, "mean": self.mean_.tolist(),
                "std": self.std_.tolist(), "class_weights": self.class_weights_.tolist(),
                "extra": extra if extra is not None else getattr(self, "extra_", {})}
        if hasattr(self, "conformal_"):
            q = self.conformal_.quantiles_
            meta.update(delta=self.delta_, quantiles=[None if np.isinf(v) else float(v) for v in q],
                        counts=self.conformal_.counts_.tolist(), per=getattr(self, "per_", "event"),
                        risk=getattr(self, "risk_", "premature"))
            if meta["per"] == "chain":  # JSON has no infinities: +inf never exits, -inf always does
                meta.update(chain_threshold=str(self.chain_threshold_) if np.isinf(self.chain_threshold_)
                            else float(self.chain_threshold_), chain_count=self.chain_count_)
        buf = io.BytesIO()
        torch.save(self.net_.state_dict(), buf)
        with atomic_dir(path) as tmp:
            (tmp / PROBE_FILE).write_text(json.dumps(meta))
            (tmp / WEIGHTS_FILE).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "LynxProbe":
        """Load a probe written by ``save`` (calibrated if it was)."""
        path = readable_dir(path)
        if not (path / PROBE_FILE).is_file():
            raise ValueError(f"{path} holds no LYNX probe ({PROBE_FILE} missing): train one with "
                             f"`offramp reason fit EVENTS --out {path}` (or LynxProbe.save)")
        fix = "fit the probe again (offramp reason fit)"
        meta = read_json(path / PROBE_FILE, "LYNX probe", fix,
                         {"hidden": list, "epochs": int, "lr": (int, float), "weight_decay": (int, float), "seed": int,
                          "mean": list, "std": list, "class_weights": list, "extra": dict, "delta": (int, float),
                          "quantiles": list, "counts": list, "per": str, "risk": str,
                          "chain_threshold": (int, float, str), "chain_count": int})
        _check_probe_meta(path / PROBE_FILE, meta, fix)
        try:
            return cls._from_meta(path, meta, fix)
        except (KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"{path} is not a valid LYNX probe ({type(e).__name__}: {e}); {fix}") from None

    @classmethod
    def _from_meta(cls, path: Path, meta: dict, fix: str) -> "LynxProbe":
        probe = cls(tuple(meta["hidden"]), meta["epochs"], meta["lr"], meta["weight_decay"], meta["seed"])
        probe.mean_ = np.array(meta["mean"], dtype=np.float32)
        probe.std_ = np.array(meta["std"], dtype=np.float32)
        probe.class_weights_ = np.array(meta["class_weights"])
        probe.net_ = probe._build(probe.mean_.shape[0])
        probe.net_.load_state_dict(load_torch_state(path / WEIGHTS_FILE, "LYNX probe weights", fix))
        probe.net_.eval()
        probe.extra_ = meta.get("extra", {})
        if "quantiles" in meta:
            conf = ClassConditionalConformal(alpha=meta["delta"])
            conf.quantiles_ = np.array([np.inf if v is None else v for v in meta["quantiles"]])
            conf.counts_ = np.array(meta["counts"])
            probe.conformal_, probe.delta_ = conf, meta["delta"]
            probe.per_, probe.risk_ = meta.get("per", "event"), meta.get("risk", "premature")
            if probe.per_ == "chain":
                probe.chain_threshold_ = float(meta["chain_threshold"])
                probe.chain_count_ = meta["chain_count"]
        return probe


def _check_probe_meta(file: Path, meta: dict, fix: str) -> None:
    """The lists of ``probe.json`` hold what the probe reads: numbers (quantiles: numbers or null),
    layer widths in [1, 65536], and the settings it was fitted with as a JSON object."""
    def bad(key: str, what: str) -> ValueError:
        return ValueError(f"{file}: {key!r} must hold {what}, got {meta.get(key)!r:.60}: the LYNX probe is damaged "
                          f"or was edited; {fix}")

    def numbers(values: list, none: bool = False) -> bool:
        return all((v is None and none) or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)

    if not all(isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 1 << 16 for h in meta.get("hidden", [])):
        raise bad("hidden", "layer widths (integers in [1, 65536])")
    for key in ("mean", "std", "class_weights", "counts"):
        if not numbers(meta.get(key) or []):
            raise bad(key, "numbers")
    if not numbers(meta.get("quantiles") or [], none=True):
        raise bad("quantiles", "numbers (null for infinity)")
    if len(meta.get("mean") or []) != len(meta.get("std") or []):
        raise bad("std", f"as many numbers as 'mean' ({len(meta.get('mean') or [])})")
    reason_config = (meta.get("extra") or {}).get("reason_config")
    if reason_config is not None and not isinstance(reason_config, dict):
        raise ValueError(f"{file}: extra.reason_config must be a JSON object (the settings of the events it was "
                         f"fitted on), got {reason_config!r:.60}; {fix}")


def probe_policy(path: str | Path) -> ProbeExitPolicy:
    """The LYNX exit rule of the calibrated probe saved in ``path`` (``offramp reason fit --out``)."""
    return ProbeExitPolicy(path=str(path), probe=LynxProbe.load(path))


def load_policy(spec: Any) -> ExitPolicy:
    """``make_policy(spec)``, and a probe spec with a path (``{"type": "probe", "path": ...}``, what
    ``ProbeExitPolicy.to_dict`` writes; alias ``lynx``) loaded from its folder."""
    if isinstance(spec, dict) and spec.get("type") in ("probe", "lynx") and spec.get("path") and "probe" not in spec:
        return probe_policy(spec["path"])
    return make_policy(spec)
