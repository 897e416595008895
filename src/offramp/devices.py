"""Where a model runs and in what precision: ``--device`` and ``--dtype``, one meaning everywhere.

``resolve_device("auto")`` is the first CUDA GPU when torch sees one, else the CPU; ``cpu``,
``cuda`` and ``cuda:N`` are checked against the machine before any work, so a missing GPU is an
error naming the fix, never a crash deep in a run. ``resolve_dtype("auto")`` is bfloat16 where the
device computes it natively (``native_bf16``), else float32. ``synchronize`` waits for a device's
queued work, so timings measure work done, not work queued.
"""

from __future__ import annotations

import re
import warnings

import torch

from offramp.names import DTYPES

DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # what --device takes
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device of a ``--device`` value: ``auto`` (or None) is ``cuda`` when torch sees a GPU,
    else ``cpu``. A CUDA device on a machine without one (or past the last GPU) is a ValueError
    that names the fix."""
    if isinstance(name, torch.device):
        name = str(name)
    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(text)
    if match is None:
        raise ValueError(f"unknown device {name!r}: use auto (a GPU when there is one), cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = f"this torch ({torch.__version__}) was built without CUDA" if torch.version.cuda is None else \
            "torch sees no CUDA GPU (check the driver and CUDA_VISIBLE_DEVICES)"
        raise ValueError(f"--device {text}: {build}; use --device cpu (or auto), or run on a machine with an "
                         "NVIDIA GPU and a CUDA build of torch")
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"--device {text}: this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
                         f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''}); name one of them")
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu``: how a command says where it runs."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively: a CUDA GPU that supports it, or a
    CPU with oneDNN's bfloat16 kernels (AVX-512 and newer). Elsewhere bfloat16 is emulated, and
    slower than float32."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype of a ``--dtype`` value (``DTYPES``). ``auto`` is bfloat16 where ``device``
    computes it natively (``native_bf16``), else float32. Asking for bfloat16 where it is emulated
    works, with a warning that float32 is faster there."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)} (auto: bfloat16 where "
                         "the hardware computes it natively, else float32)")
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name == "bfloat16" and not native_bf16(device):
        warnings.warn(f"bfloat16 is emulated on this {'GPU' if str(device).startswith('cuda') else 'CPU'} "
                      "(no native bfloat16 kernels) and runs slower than float32 here: use --dtype auto or "
                      "float32", stacklevel=2)
    return getattr(torch, name)


def synchronize(device: torch.device | str) -> None:
    """Wait until ``device`` has finished its queued work (CUDA kernels run asynchronously); a no-op
    on the CPU. Timed regions begin and end with it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without parameters)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


__all__ = ["DEVICES", "describe_device", "module_device", "native_bf16", "resolve_device", "resolve_dtype",
           "synchronize"]
