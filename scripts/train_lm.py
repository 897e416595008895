"""The previous release's training script, kept so that existing command lines and launchers
(``accelerate launch scripts/train_lm.py ...``) still run: it is ``offramp train-lm`` now
(``offramp.training.small_lm``)."""

from __future__ import annotations

import sys

from offramp.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-lm", *sys.argv[1:]]))
