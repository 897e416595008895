"""Train a tiny early-exit model the way a test asks (run alone, or by torchrun on N processes).

    python tests/multiprocess_worker.py MODE BACKBONE_DIR OUT_DIR     (MODE: frozen | full | jei)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_jei_train import _data  # noqa: E402

from offramp import EarlyExitModel, OfframpConfig  # noqa: E402
from offramp.training import TrainingArgs, train  # noqa: E402
from offramp.training.jei import JEIArgs, jei_config, train_jei  # noqa: E402


def main(mode: str, backbone: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = {"dropout": 0.0}  # no random masks: one process and N processes see the same numbers
    if mode == "jei":
        model = EarlyExitModel.from_backbone(backbone, OfframpConfig(num_labels=3, head=head, **jei_config(0.5)))
        train_jei(model, _data(4, 0), _data(2, 100),
                  JEIArgs(output_dir=out, epochs=2, warmup_epochs=2, patience=5, phase_batches=2, lr=1e-2,
                          gate_lr=5e-2))
        return
    model = EarlyExitModel.from_backbone(backbone, OfframpConfig(num_labels=3, head=head))
    full = mode == "full"
    train(model, _data(4, 0), _data(2, 100),
          TrainingArgs(output_dir=out, epochs=2, lr=1e-2, frozen_backbone=not full,
                       backbone_lr=1e-3 if full else None, cache_backbone=not full, progress=False))


if __name__ == "__main__":
    main(*sys.argv[1:4])
