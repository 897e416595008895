"""Small shared helpers: atomic file and directory writes, and loaders that never run code."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from offramp.names import CONFIG_NAME


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader never sees a half-written file: either the old content or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or
    the file system has no such call (the caller then falls back to two renames)."""
    fn = getattr(_libc(), "renameat2", None) if sys.platform.startswith("linux") else None
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _old_copy(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def readable_dir(path: str | os.PathLike) -> Path:
    """The folder a reader should open for ``path``: ``path`` itself, or the previous copy that a
    save killed between its two renames left in ``.NAME.old`` (only where the OS cannot swap two
    folders in one step). Reads nothing and changes nothing."""
    path = Path(path)
    if not path.exists() and _old_copy(path).is_dir():
        return _old_copy(path)
    return path


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove what killed saves of ``path`` left beside it; returns what was removed.

    Temporary folders ``.NAME.<pid>.*.tmp`` of processes that no longer run are deleted; a
    ``.NAME.old`` is put back at ``path`` when ``path`` is missing (the swap was cut between its
    two renames), else deleted.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        parts = p.name[len(path.name) + 2:].split(".")
        if parts and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            _remove(p)
            removed.append(p)
    old = _old_copy(path)
    if old.exists():
        if path.exists():
            _remove(old)
            removed.append(old)
        else:
            os.replace(old, path)
    return removed


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it into ``path`` in one step.

    Usage: ``with atomic_dir(out) as tmp: write files into tmp``. If the block raises, ``path``
    keeps its previous content and the temporary folder is removed. An existing ``path`` is
    exchanged with the new folder in one ``renameat2(RENAME_EXCHANGE)`` where the OS has it, so a
    kill at any moment leaves either the old or the new folder at ``path``. Elsewhere the old one
    is moved to ``.NAME.old`` first; a kill between the two renames leaves it there, where
    :func:`readable_dir` finds it and the next save puts it back. What killed saves left beside
    ``path`` is removed by the next save (:func:`clean_stale`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous folder
    else:
        old = _old_copy(path)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    """Flush the files of ``folder`` to disk before it is renamed into place."""
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ loading
def asks_for_code(error: BaseException) -> bool:
    """Whether torch's weights-only refusal ``error`` is a pickle asking for a Python object (which
    could run code), rather than bytes that are no pickle at all."""
    return "GLOBAL" in str(error)


def unsafe_global(error: BaseException) -> str:
    """The Python object a refused pickle asked for, from torch's weights-only error text."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    return f"it asks for {found.group(1)}" if found else "an object that is not a tensor"


def read_json(path: str | os.PathLike, what: str, fix: str, types: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON object from ``path``; a ValueError naming the file, ``what`` it should be and ``fix``.
    ``types`` ({key: type or tuple of types}): a key present (and not null) of another type is refused
    too, naming the key."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: {what} not found; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the {what} is damaged; {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object: it is not a valid "
                         f"{what}; {fix}")
    for key, kind in (types or {}).items():
        value = data.get(key)
        if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and bool not in (
                kind if isinstance(kind, tuple) else (kind,)))):
            names = " or ".join(JSON_TYPE_NAMES.get(k, k.__name__) for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ValueError(f"{path}: {key!r} must be {names}, got {value!r:.60}: the {what} is damaged or was "
                             f"edited; {fix}")
    return data


JSON_TYPE_NAMES = {dict: "a JSON object", list: "a list", str: "a string", int: "an integer", float: "a number",
                   bool: "true or false"}


def load_safetensors(path: str | os.PathLike, what: str, fix: str, device: str = "cpu") -> dict[str, Any]:
    """The tensors of a safetensors file; a damaged or foreign file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing: no {what}; {fix}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): the {what} is damaged or "
                         f"truncated; {fix}") from None


def stored_shapes(path: str | os.PathLike, what: str, fix: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a safetensors file, read from its header alone (no tensor is loaded); a
    damaged or foreign file is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing: no {what}; {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): the {what} is damaged or "
                         f"truncated; {fix}") from None


def load_torch_state(path: str | os.PathLike, what: str, fix: str) -> Any:
    """A ``torch.save`` file of tensors and plain values, loaded with ``weights_only=True``.

    A file that needs any other Python object (a crafted pickle could run code while it loads) is
    refused with a ValueError, and nothing in it runs.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing: no {what}; {fix}")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if not asks_for_code(e):  # bytes that are no pickle at all
            raise ValueError(f"{path} is not a readable {what}: it is not a file torch.save wrote; {fix}") from None
        raise ValueError(f"{path}: refused to load the {what}: it holds more than tensors and plain values "
                         f"({unsafe_global(e)}), and loading it could run code. Use only files that offramp "
                         f"wrote; {fix}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path} is not a readable {what} ({type(e).__name__}: {e}); {fix}") from None


# ----------------------------------------------------------------------------------------- progress
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress bar and progress line offramp writes to stderr."""
    global _quiet
    _quiet = bool(quiet)
    if "transformers" in sys.modules or quiet:  # the bars of the libraries offramp calls
        from transformers.utils import logging as hf_logging

        (hf_logging.disable_progress_bar if quiet else hf_logging.enable_progress_bar)()


def is_quiet() -> bool:
    return _quiet


def process_rank() -> int:
    """This process's rank under ``torchrun`` / ``accelerate launch`` (0 when launched alone)."""
    return int(os.environ.get("RANK", "0") or 0)


def note(msg: str) -> None:
    """A progress line on stderr (stdout carries results); none after ``set_quiet(True)`` and none
    from the other processes of a multi-process run (the main one reports)."""
    if not _quiet and process_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def progress(iterable: Any, *, desc: str, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar on stderr over ``iterable`` (none when ``enabled`` is False, after ``set_quiet``
    and on the other processes of a multi-process run)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=_quiet or not enabled or process_rank() != 0, file=sys.stderr,
                **kwargs)


_T0 = time.time()


def log(msg: str) -> None:
    """A progress line on stderr with the seconds since start (none after ``--quiet``)."""
    note(f"[{time.time() - _T0:6.1f}s] {msg}")


def check_out(path: Path, overwrite: bool, what: str, inputs: dict[str, Any] | None = None, *,
              file: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: an existing non-empty one
    (unless ``overwrite``), one below a regular file, or one in a folder this process cannot write;
    and, even with ``overwrite``, one that is, holds or sits inside one of the command's
    ``inputs`` ({option: path}; None values skipped): writing it would replace what the command reads."""
    path = Path(path)
    if file and path.is_dir():
        raise ValueError(f"{what} {path} is a folder: name a file in it (for example {path / 'out.json'})")
    overlap = _overlap(path, inputs or {})
    if overlap:
        raise ValueError(f"{what} {path} {overlap}: the command would replace what it reads; choose an --out "
                         "outside its inputs")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{what} {path}: {parent} is a file, not a folder; choose another --out")
    if path.exists() and (path.is_file() or any(path.iterdir())) and not overwrite:
        raise ValueError(f"{what} {path} already exists; pass --overwrite to replace what it holds, "
                         "or choose another --out")
    base = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    base = base if base.is_dir() else base.parent
    try:  # the one test that works for every reason a write can fail (permissions, read-only mounts)
        fd, probe = tempfile.mkstemp(prefix=".offramp-write-check.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be written: {base} is not writable ({e.strerror}); "
                         "choose another --out") from None


def _overlap(out: Path, inputs: dict[str, Any]) -> str:
    """How ``out`` meets the first input it meets ("is --model X", "holds --data X", "is inside
    --trace X"), or ""."""
    target = out.resolve()
    for option, value in inputs.items():
        if value is None or not Path(str(value)).exists():
            continue  # a Hub id, an offline alias or a built-in data set name: no path of the user's
        src = Path(str(value)).resolve()
        if target == src:
            return f"is {option} {value}"
        if target in src.parents:
            return f"holds {option} {value}"
        if src in target.parents:
            return f"is inside {option} {value}"
    return ""


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """``path`` if it is (or holds, under checkpoint/) an offramp checkpoint; else a ValueError. Reads
    no file and loads no library, so a wrong path is reported at once."""
    p = readable_dir(path)  # a save killed between its two renames left the previous copy in .NAME.old
    for cand in (p, readable_dir(p / "checkpoint")):
        if (cand / CONFIG_NAME).is_file():
            return cand
    raise ValueError(f"{p} is not an offramp checkpoint folder ({CONFIG_NAME} not found in it or in "
                     f"{p / 'checkpoint'}); give the --out folder of `offramp train` or a save_pretrained folder")
