"""``offramp`` commands run in the test process."""

from __future__ import annotations

import torch

from offramp.cli import main


def cli(*argv: object) -> int:
    """``offramp ARGV`` in this process, on one thread (tiny models: threads only add waiting)."""
    threads = torch.get_num_threads()
    try:
        return main(["--threads", "1", *[str(a) for a in argv]])
    finally:
        torch.set_num_threads(threads)
