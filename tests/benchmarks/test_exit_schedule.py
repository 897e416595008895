"""benchmarks/exit_schedule.py: the engine follows a scheduled exit depth per step under every
transformer cache strategy, and a schedule is checked before any work."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from decoder_models import tiny_decoder
from paths import ROOT

from offramp.engines.generate import SamplingOptions, generate
from offramp.modeling import DecoderExitModel


def _bench():
    path = ROOT / "benchmarks" / "exit_schedule.py"
    spec = importlib.util.spec_from_file_location("exit_schedule_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("strategy", ["catch_up", "copy_kv", "propagate"])
def test_tokens_leave_at_the_scheduled_exit_step_after_step(strategy):
    bench = _bench()
    exits = DecoderExitModel.from_backbone(tiny_decoder("llama", layers=6), exit_layers=[2, 4], head="tied")
    depths = (2, 6, 3, 4, 1, 6, 2)  # 3 leaves at the first exit at or after it (4); 6 never exits
    ids = torch.tensor([[5, 9, 11, 7]])
    out = generate(exits, ids, policy=bench.ScheduledExits(depths=depths), cache_strategy=strategy,
                   max_new_tokens=8, sampling=SamplingOptions(eos_token_id=None, pad_token_id=0))
    # the first token comes from the prompt's pass (every layer); step i then follows depths[i]
    assert out.exit_layers[0].tolist() == [6, 2, 6, 4, 4, 2, 6, 2]


def test_a_schedule_is_checked_and_priced():
    bench = _bench()
    assert bench.parse_schedule("2:0.25,6:0.75", [2, 4], 6) == {2: 0.25, 6: 0.75}
    with pytest.raises(ValueError, match="not an exit"):
        bench.parse_schedule("3:1", [2, 4], 6)
    with pytest.raises(ValueError, match="sum to 0.900"):
        bench.parse_schedule("2:0.5,6:0.4", [2, 4], 6)
    with pytest.raises(ValueError, match="layer:share"):
        bench.parse_schedule("2-1", [2, 4], 6)
    drawn = bench.draw_depths({2: 0.25, 6: 0.75}, 4000, seed=0)
    assert set(drawn) == {2, 6} and 0.2 < drawn.count(2) / 4000 < 0.3
    # a layer costs 1, the head 2: a full step 8; tokens at 2 and 6 cost 4 and 8
    assert bench.ideal_ratio((2, 6), 1.0, 2.0, 6) == pytest.approx(8 / 6)
    with pytest.raises(ValueError, match="depths"):
        bench.ScheduledExits(depths=())
