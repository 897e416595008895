"""Other libraries' lossless decoders, as benchmark methods beside offramp's (batch 1 only).

Each method takes a tokenized batch of one row (``input_ids``, ``attention_mask``) and returns the
new tokens (1, n). Hugging Face ``generate`` is always there: plain greedy, self-speculation from
an early exit (``assistant_early_exit``) and prompt lookup. economize (``pip install --no-deps
economize``; a benchmark peer, not an offramp dependency) adds its early-exit self-drafter on the
model's own head and its prompt lookup, when it is installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import torch


def hf_methods(backbone, *, new_tokens: int, pad: int | None, exits: Sequence[int] = (),
               lookup: int | None = 10) -> dict[str, Callable]:
    def hf(b, **kw):
        out = backbone.generate(**b, do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad, **kw)
        return out[:, b["input_ids"].shape[1]:]

    methods: dict[str, Callable] = {}
    for layer in exits:
        methods[f"hf_assistant_early_exit@{layer}"] = lambda b, layer=layer: hf(b, assistant_early_exit=layer)
    if lookup:
        methods[f"hf_prompt_lookup@{lookup}"] = lambda b: hf(b, prompt_lookup_num_tokens=lookup)
    return methods


def economize_methods(backbone, *, new_tokens: int, eos: int | None, exits: Sequence[int] = (),
                      cycle: int = 4, lookup: bool = True, log=print) -> dict[str, Callable]:
    """economize's training-free drafters (empty when economize is not installed)."""
    if importlib.util.find_spec("economize") is None:
        log("economize is not installed: its rows are left out (pip install --no-deps economize)")
        return {}
    import economize
    from economize.techniques.early_exit import EarlyExitConfig
    from economize.techniques.lookup import LookupConfig

    config = economize.DecodeConfig(cycle_length=cycle)

    def runner(model):
        def run(b):
            ids = b["input_ids"][0][b["attention_mask"][0].bool()]
            with torch.no_grad():
                res = model.decode(ids, new_tokens, decoding=config, stop=eos)
            return torch.as_tensor(res.tokens).reshape(1, -1)

        return run

    methods: dict[str, Callable] = {}
    for layer in exits:
        model = economize.apply(backbone, EarlyExitConfig(exit_layer=layer, head="shared", adaptation="frozen"))
        methods[f"economize_early_exit@{layer}/c{cycle}"] = runner(model)
    if lookup:
        methods[f"economize_lookup/c{cycle}"] = runner(economize.apply(backbone, LookupConfig()))
    return methods
