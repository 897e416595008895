"""The previous release's training script, kept so that existing command lines and launchers
(``accelerate launch scripts/train_lm.py ...``) still run: it is ``offramp train-lm`` now
(``offramp.training.small_lm``). ``--threads N`` is passed on as ``offramp --threads N``."""

from __future__ import annotations

import sys

from offramp.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    head: list[str] = []
    if "--threads" in argv:  # a global option of offramp
        i = argv.index("--threads")
        head, argv = argv[i:i + 2], argv[:i] + argv[i + 2:]
    sys.exit(main([*head, "train-lm", *argv]))
