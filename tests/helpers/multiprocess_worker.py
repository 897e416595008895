"""Train a tiny early-exit model the way a test asks (run alone, or by torchrun on N processes).

    python tests/multiprocess_worker.py MODE BACKBONE_DIR OUT_DIR [stop|resume]

MODE: frozen | full | jei. ``stop`` ends the run after its first checkpoint (after epoch 1; for
JEI, after the warm-up), the way an interrupted run ends; ``resume`` continues from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoders import labelled_batches as _data  # noqa: E402

from offramp import EarlyExitModel, OfframpConfig  # noqa: E402
from offramp.training import (  # noqa: E402
    TrainingArgs,
    jei,  # noqa: E402
    train,
)


class Interrupted(Exception):
    """Raised where the run stops after its first checkpoint."""


def _interrupt(*_args, **_kwargs) -> None:
    raise Interrupted


def main(mode: str, backbone: str, out: str, how: str = "") -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = {"dropout": 0.0}  # no random masks: one process and N processes see the same numbers
    resume = how == "resume"
    if mode == "jei":
        if how == "stop":
            jei._alternate = _interrupt  # the warm-up checkpoint is written before the alternating stage
        model = EarlyExitModel.from_backbone(backbone, OfframpConfig(num_labels=3, head=head, **jei.jei_config(0.5)))
        jei.train_jei(model, _data(4, 0), _data(2, 100),
                      jei.JEIArgs(output_dir=out, epochs=2, warmup_epochs=2, patience=5, phase_batches=2, lr=1e-2,
                                  gate_lr=5e-2, resume=resume))
        return
    model = EarlyExitModel.from_backbone(backbone, OfframpConfig(num_labels=3, head=head))
    full = mode == "full"
    train(model, _data(4, 0), _data(2, 100),
          TrainingArgs(output_dir=out, epochs=2, lr=1e-2, frozen_backbone=not full,
                       backbone_lr=1e-3 if full else None, cache_backbone=not full, progress=False, resume=resume),
          on_epoch_end=_interrupt if how == "stop" else None)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:5])
    except Interrupted:
        sys.exit(3)
