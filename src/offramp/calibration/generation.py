"""Learn-then-Test on real generations: thresholds whose risk is measured on the text they generate.

A token trace is the full model's own continuation, teacher-forced. Greedy decoding with the
exact ``catch_up`` cache sees exactly its hidden states until a token differs, so the trace
certifies "the text equals the full model's" (risk ``sequence``, tolerance 0) exactly. Every other
case (a tolerance, the token share, an approximate cache) changes the text after the first
difference in ways a trace cannot see: there the losses must come from generating. This module
does that, as CALM calibrates: per candidate threshold, generate the calibration prompts with the
exits and compare each text with the full model's greedy text; fixed-sequence testing stops at the
first candidate that fails, so only the candidates it walks through are generated.

Per-sequence loss: ``share`` = the share of positions of the longer of the two texts where they
differ (a missing token counts as different); risk ``token`` is the share, risk ``sequence`` is
1 when the share exceeds ``tolerance``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from offramp.calibration.risk import TOKEN_RISKS, LearnThenTest
from offramp.engines.generate import decoded_exit_layers, generate
from offramp.engines.generate.sampling import SamplingOptions
from offramp.policies import ExitSpace, make_policy


def row_tokens(out: Any) -> list[list[int]]:
    """The generated tokens of each row of a ``GenerateOutput``, up to and including its EOS."""
    return [out.new_tokens[r][out.exit_layers[r] > 0].tolist() for r in range(out.new_tokens.shape[0])]


def share_different(full: Sequence[int], early: Sequence[int]) -> float:
    """Share of the positions of the longer text where the two differ (0 = the same text)."""
    n = max(len(full), len(early), 1)
    return 1.0 - sum(a == b for a, b in zip(full, early)) / n


def generate_rows(model: Any, batches: Sequence[tuple[Tensor, Tensor]], policy: Any, *, cache_strategy: str | None,
                  max_new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy texts of every prompt under ``policy`` (None: the full model) and the mean exit layer."""
    greedy = SamplingOptions.from_model(model.backbone, do_sample=False)
    rows: list[list[int]] = []
    layers: list[Tensor] = []
    for ids, mask in batches:
        out = generate(model, ids, mask, policy=policy or "never", cache_strategy=cache_strategy,
                       max_new_tokens=max_new_tokens, sampling=greedy)
        rows += row_tokens(out)
        layers.append(decoded_exit_layers(out).float())
    every = torch.cat(layers) if layers else torch.zeros(0)
    return rows, float(every.mean()) if every.numel() else float(model.num_layers)


def calibrate_generation(model: Any, batches: Sequence[tuple[Tensor, Tensor]], policy: Any, *, delta: float,
                         epsilon: float, risk: str = "sequence", tolerance: float = 0.0, pvalue: str = "hoeffding",
                         cache_strategy: str | None = None, max_new_tokens: int = 32,
                         candidates: Sequence[float] | None = None, log: Any = None) -> LearnThenTest:
    """Certify ``policy``'s threshold on real greedy generations of the calibration prompts.

    Args:
        model: a ``DecoderExitModel``.
        batches: (input_ids, attention_mask) left-padded prompt batches (the calibration prompts,
            exchangeable with the prompts the threshold will serve, unseen in training).
        policy: the generation policy to calibrate (its threshold field is moved).
        risk: ``sequence`` (share > ``tolerance``) or ``token`` (the share).
        cache_strategy: the strategy the threshold will be used with (the guarantee is for it).
        candidates: thresholds, most conservative first (default: the policy's own, 101 of them: the
            walk generates only up to the first that fails, so a fine grid costs passes only where
            thresholds pass).
        log: called with one line per candidate walked (progress).

    Returns:
        The fitted ``LearnThenTest`` (``policy_``, ``threshold_``, ``steps_``, ``summary()``).
    """
    if risk not in TOKEN_RISKS:
        raise ValueError(f"risk {risk!r}: generations are calibrated on {' or '.join(TOKEN_RISKS)}")
    if not batches:
        raise ValueError("no calibration prompts: give at least one")
    policy = make_policy(policy)
    ltt = LearnThenTest(delta, epsilon, risk=risk, pvalue=pvalue, tolerance=tolerance)
    full, _ = generate_rows(model, batches, None, cache_strategy=cache_strategy, max_new_tokens=max_new_tokens)
    space = ExitSpace(tuple(model.exit_layers), model.adapter.vocab_size, model.num_layers)
    grid = policy.candidates(space, 101) if candidates is None else np.asarray(candidates, dtype=np.float64)

    def losses_of(candidate: Any) -> tuple[np.ndarray, float]:
        rows, layer = generate_rows(model, batches, candidate, cache_strategy=cache_strategy,
                                    max_new_tokens=max_new_tokens)
        share = np.array([share_different(a, b) for a, b in zip(full, rows)])
        loss = share if risk == "token" else (share > tolerance).astype(np.float64)
        if log is not None:
            log(f"{candidate.to_dict()}: {risk} risk {loss.mean():.4f} on {loss.size} prompts, "
                f"mean exit layer {layer:.2f}")
        return loss, layer

    ltt.fit_sequential(policy, losses_of, grid)
    default = "copy_kv" if model.adapter.kind == "attention" else "freeze"
    ltt.source_ = {"source": "generation", "cache_strategy": cache_strategy or default,
                   "max_new_tokens": max_new_tokens}
    return ltt
