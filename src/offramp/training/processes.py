"""One Accelerator for every training loop, on one process or several.

``accelerate launch --num_processes N`` (on GPUs) and ``torchrun --nproc_per_node N`` (also on
CPUs, with gloo) start N processes and set ``WORLD_SIZE``. On a machine without a GPU, Accelerate
joins those processes only when the Accelerator is built with ``cpu=True``; otherwise each would
train alone and write the same checkpoint. ``make_accelerator`` builds it that way and refuses a
launch whose processes did not join.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from offramp.devices import resolve_device, resolve_dtype

PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


def make_accelerator(device: str | torch.device = "auto", dtype: str = "float32", **kwargs: Any):
    """An ``accelerate.Accelerator`` on ``device`` (``auto``: the GPUs when there are any, else the
    CPU with gloo), training in ``dtype``'s mixed precision: float32 none, bfloat16 / float16
    Accelerate's autocast with float32 weights (``auto``: bfloat16 where the device computes it
    natively). A missing GPU, or float16 on a CPU, is an error before any work."""
    from accelerate import Accelerator

    dev = resolve_device(device)
    precision = PRECISION[resolve_dtype(dtype, dev)]
    if precision == "fp16" and dev.type != "cuda":
        raise ValueError("--dtype float16 trains with float16 mixed precision, which needs a GPU: use bfloat16 "
                         "or float32 on a CPU")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if dev.type == "cuda" and world == 1:
        torch.cuda.set_device(dev)  # one process: the GPU named (launchers give each process its own)
    acc = Accelerator(cpu=dev.type != "cuda", mixed_precision=precision, **kwargs)
    if acc.num_processes != world:
        raise ValueError(f"{world} processes were launched but Accelerate joined {acc.num_processes}: launch with "
                         "`torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N` "
                         "(`accelerate launch --cpu` starts a single process)")
    return acc


def shard_rows(batch: dict, rank: int, world: int, batch_dim: dict[str, int] | None = None
               ) -> tuple[dict | None, float]:
    """This process's rows of a global batch (every ``world``-th from ``rank``) and the weight that
    makes the processes' averaged mean losses the global batch's mean loss; (None, 0) when the
    batch has fewer rows than processes (every process then skips it). ``batch_dim`` names keys
    whose rows are not on dim 0."""
    if world == 1:
        return batch, 1.0
    dims = batch_dim or {}
    n = int(batch["labels"].shape[0])
    if n < world:
        return None, 0.0
    part = {}
    for k, v in batch.items():
        d = dims.get(k, 0)
        part[k] = v.index_select(d, torch.arange(rank, v.shape[d], world, device=v.device))
    return part, world * int(part["labels"].shape[0]) / n


def average_gradients(accelerator, params) -> None:
    """Average the gradients of ``params`` over the processes (for loops that step their own
    optimizers on parameter subsets, where DDP's wrapper does not fit)."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad, "mean")


__all__ = ["average_gradients", "make_accelerator", "shard_rows"]
