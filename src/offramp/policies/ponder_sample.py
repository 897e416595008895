from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from offramp.policies.base import ExitPolicy, ExitSignals, PolicyState, keyed_uniform


@dataclass(frozen=True)
class PonderSamplePolicy(ExitPolicy):
    """PonderNet's stochastic rule: at each exit draw Bernoulli(lambda_i) and exit on 1.

    The uniform of row r at exit i is a hash of (r's row key, ``seed``, i): the row key is a hash of
    its token ids (``offramp.policies.base.row_keys``), so a row takes the same exits whatever batch
    it is in and wherever in it, online and replayed from a trace.
    """

    type = "ponder_sample"
    needs = ("halting", "row_key")
    seed: int = 0

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        if signals.halting is None:
            raise ValueError("the ponder_sample policy needs a halting layer: build the model with halting={...}")
        if signals.row_key is None:
            raise ValueError("the ponder_sample policy needs row keys (hashes of the rows' token ids): "
                             "collect the trace again with this version of offramp")
        u = keyed_uniform(signals.row_key, self.seed, index)
        return u < signals.halting.to(u.device).double(), state
