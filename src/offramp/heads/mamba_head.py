"""The DYNAMAX exit head: a Mamba block whose output feeds the shared final norm + LM head.

Features are ``h + Mixer(norm(h))``. The mixer is HF's ``MambaMixer`` (selective SSM with a causal
conv), so the head carries its own recurrent state across the tokens of a sequence: in training it
scans the whole sequence (cache=None); in decoding the engine gives it a per-row state view
(``offramp.engines.generate.cache.SSMStore``), updated for every token that reaches its layer and,
for tokens that exit earlier, with their exit hidden state. The output projection is
zero-initialised so the head starts as the tied head. It serves Mamba and transformer backbones.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from offramp.heads.lm import LMExitHead, RMSNorm


class MambaExitHead(LMExitHead):
    """Mamba-block exit head.

    Args:
        hidden_size: backbone hidden size d.
        expand: inner width = expand * d (1 keeps it near a third of a transformer layer).
        state_size: SSM state per channel.
        conv_kernel: causal conv width.
    """

    type = "mamba"
    stateful = True

    def __init__(self, hidden_size: int, expand: int = 1, state_size: int = 16, conv_kernel: int = 4,
                 **kwargs: Any) -> None:
        super().__init__(hidden_size)
        from transformers import MambaConfig
        from transformers.models.mamba.modeling_mamba import MambaMixer

        cfg = MambaConfig(hidden_size=hidden_size, intermediate_size=expand * hidden_size, state_size=state_size,
                          conv_kernel=conv_kernel, time_step_rank=math.ceil(hidden_size / 16), num_hidden_layers=1,
                          vocab_size=8, use_mambapy=True)  # pscan if mambapy is installed
        self.norm = RMSNorm(hidden_size)
        self.mixer = MambaMixer(cfg, layer_idx=0)
        nn.init.zeros_(self.mixer.out_proj.weight)

    def forward(self, hidden: Tensor, cache: Any = None, mask: Tensor | None = None) -> Tensor:
        was_training = self.mixer.training
        self.mixer.train(False)  # the fused-kernel shortcut only exists with CUDA kernels
        out = self.mixer(self.norm(hidden), cache=cache, attention_mask=mask)
        self.mixer.train(was_training)
        return hidden + out
