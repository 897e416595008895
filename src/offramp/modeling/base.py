"""The base of every exit model: exit layers, adapter, atomic save, load with version and kind checks.

``ExitModelBase`` is shared by the encoder classifier (``EarlyExitModel``, kind ``classifier``) and
the decoder's token exits (``DecoderExitModel``, kind ``token_exits``). A checkpoint folder is
``offramp_config.json`` (``offramp.config``: one format with a ``kind``) + ``offramp_heads.safetensors``
(the heads' state dict) + what the kind adds (an encoder's ``backbone/`` and tokenizer). The folder
is written under a temporary name and swapped in (``offramp.utils.atomic_dir``); ``load`` opens any
kind.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

from safetensors.torch import save_file
from torch import Tensor, nn

from offramp.config import CONFIG_NAME, KIND_USE, KINDS, read_config
from offramp.data.assets import offline_hint, resolve_model_path
from offramp.devices import native_bf16, resolve_device, resolve_dtype  # noqa: F401 (re-exported)
from offramp.utils import atomic_dir, atomic_write_json, load_safetensors, readable_dir, stored_shapes, unsafe_global

HEADS_NAME = "offramp_heads.safetensors"


def load_hf_model(auto_class: Any, spec: str | os.PathLike, what: str, **kwargs: Any) -> nn.Module:
    """``auto_class.from_pretrained(spec)`` (``spec``: a folder, a Hub id or an offline alias) with
    every way a folder can be bad turned into a ValueError naming it (a missing folder, damaged weights, a config that is not JSON, a pickle that would
    need to run code). ``trust_remote_code`` is always passed as False, so transformers never asks on stdin whether to run
    a folder's code (a "y" there would run it); a folder that needs its own code is refused."""
    import pickle

    from safetensors import SafetensorError

    kwargs = _no_remote_code(kwargs)
    spec = resolve_model_path(str(spec))  # offline aliases (minilm, mpnet, smollm2-offline, ...)
    local = Path(str(spec)).exists()
    if local and (Path(str(spec)) / CONFIG_NAME).is_file() and not (Path(str(spec)) / "config.json").is_file():
        kind, _ = read_config(spec)  # offramp's own folder (a model trained to exit also holds config.json)
        raise ValueError(f"{spec} holds {KINDS[kind]}, not a Hugging Face {what}: use it with {KIND_USE[kind]}")
    try:
        if local:
            check_config_fits_weights(auto_class, Path(str(spec)), what)
        return auto_class.from_pretrained(str(spec), **kwargs)
    except OSError as e:
        raise ValueError(f"cannot load the {what} {str(spec)!r}: {e}. Give a local HF model folder or a Hub id "
                         f"(Hub ids need internet access). {offline_hint(str(spec))}") from None
    except pickle.UnpicklingError as e:
        raise ValueError(f"refused to load the {what} {str(spec)!r}: its weights file is a pickle that holds "
                         f"more than tensors ({unsafe_global(e)}), and loading it could run code. Use a folder "
                         "with model.safetensors, or convert the weights with a tool you trust") from None
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, RuntimeError, KeyError, ValueError,
            EOFError) as e:
        if isinstance(e, ValueError) and _asks_for_code(e):
            raise ValueError(_code_refusal(what, spec)) from None
        if not local and not isinstance(e, ValueError):
            raise
        raise ValueError(f"cannot load the {what} {str(spec)!r}: its files are damaged or not a HF model "
                         f"({type(e).__name__}: {e}); save the model again or point to another folder") from None


LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """{name: shape} of a HF model folder's safetensors weights (one file or shards), from the headers
    alone; None where the folder has no safetensors weights."""
    fix = "save the model again or point to another folder"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a shard index ({type(e).__name__}: {e}); {fix}") from None
        out: dict[str, tuple[int, ...]] = {}
        for shard in shards:
            if Path(shard).name != shard:
                raise ValueError(f"{index} names a shard outside its folder ({shard!r}); {fix}")
            out.update(stored_shapes(folder / shard, "model weights", fix))
        return out
    if (folder / "model.safetensors").is_file():
        return stored_shapes(folder / "model.safetensors", "model weights", fix)
    return None


def check_config_fits_weights(auto_class: Any, folder: Path, what: str) -> None:
    """Refuse, before anything is allocated, a folder whose config.json describes a model larger
    than its weights: more layers than the weights hold (a crafted ``num_hidden_layers`` of 10^9
    would build modules until the process dies), or sizes (hidden, intermediate, vocabulary) whose
    parameters the weights do not hold. The model is built on the meta device (no memory) to count."""
    import math

    import torch
    from transformers import AutoConfig

    shapes = weight_shapes(folder)
    if shapes is None or not (folder / "config.json").is_file():
        return  # no safetensors header to compare with (transformers reads the rest, weights-only)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    layers = getattr(config, "num_hidden_layers", None)
    held = {int(m.group(1)) for name in shapes for m in [LAYER_INDEX.search(name)] if m}
    if isinstance(layers, int) and held and layers > max(held) + 1:
        raise ValueError(f"{folder / 'config.json'} says num_hidden_layers {layers}, but the weights hold layers "
                         f"0..{max(held)}: the config was edited or belongs to another model; fix "
                         f"num_hidden_layers or save the {what} again")
    stored = sum(math.prod(s) for s in shapes.values())
    with torch.device("meta"):
        shell = auto_class.from_config(config)
    wanted = sum(p.numel() for p in shell.parameters())
    if wanted > 1.25 * stored + 1_000_000:
        sizes = ", ".join(f"{k} {getattr(config, k)}" for k in ("hidden_size", "intermediate_size", "vocab_size",
                                                                  "num_hidden_layers") if hasattr(config, k))
        raise ValueError(f"{folder / 'config.json'} describes a model of {wanted:,} parameters, but the weights "
                         f"hold {stored:,}: a size in the config ({sizes}) does not match the weights; fix the "
                         f"config or save the {what} again")


def load_hf_tokenizer(spec: str | os.PathLike, what: str = "tokenizer", **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(spec)`` with ``trust_remote_code=False`` (never a question on
    stdin; a tokenizer that needs its own code is refused) and its errors as a ValueError naming
    ``spec``. ``spec`` may be an offline alias."""
    from transformers import AutoTokenizer

    kwargs = _no_remote_code(kwargs)
    spec = resolve_model_path(str(spec))
    try:
        return AutoTokenizer.from_pretrained(str(spec), **kwargs)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        if _asks_for_code(e):
            raise ValueError(_code_refusal(what, spec)) from None
        raise ValueError(f"cannot load the {what} of {str(spec)!r} ({type(e).__name__}: {e}); give a local HF "
                         f"model folder or a Hub id (Hub ids need internet access). {offline_hint(str(spec))}"
                         ) from None


def _no_remote_code(kwargs: dict[str, Any]) -> dict[str, Any]:
    if kwargs.get("trust_remote_code"):
        raise ValueError("trust_remote_code is not supported: offramp never runs code from a model folder")
    return {**kwargs, "trust_remote_code": False}


def _asks_for_code(error: BaseException) -> bool:
    text = str(error)
    return "trust_remote_code" in text or "custom code" in text


def _code_refusal(what: str, spec: Any) -> str:
    return (f"refused to load the {what} {str(spec)!r}: it needs to run its own Python code (an auto_map in its "
            "config), and offramp never runs code from a model folder. Use a model whose architecture "
            "transformers ships, or convert it to one")


def shape_mismatches(module: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """``name (saved shape) (needs shape)`` for each tensor of ``state`` whose shape differs from
    ``module``'s (load_state_dict would raise a RuntimeError on them)."""
    own = module.state_dict()
    return [f"{k} {tuple(v.shape)} (needs {tuple(own[k].shape)})" for k, v in state.items()
            if k in own and own[k].shape != v.shape]


class ExitModelBase(nn.Module):
    """Exits on a HF backbone. Subclasses set ``kind``, ``config_class`` and ``_exit_layers``, and
    implement ``_parts`` (the constructor's arguments for a saved config) and optionally ``_write_extra``.

    Attributes:
        kind: the checkpoint kind (``offramp.config.KINDS``).
        legacy_heads: head file names of earlier releases, read when ``offramp_heads.safetensors``
            is absent.
        fix: what to do about a damaged checkpoint (said in errors).
    """

    kind: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    legacy_heads: ClassVar[tuple[str, ...]] = ()
    fix: ClassVar[str] = "train or save the checkpoint again"

    _exit_layers: list[int]
    adapter: Any
    config: Any

    @property
    def exit_layers(self) -> list[int]:
        """The 1-based layer each exit reads, ascending."""
        return list(self._exit_layers)

    @property
    def num_exits(self) -> int:
        return len(self._exit_layers)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    # -- save -----------------------------------------------------------------------------------
    def head_state_dict(self) -> dict[str, Tensor]:
        """The exits' own tensors (heads, halting layer, gates, confidence classifiers): no backbone."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if not k.startswith("backbone.")}

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the checkpoint folder atomically: an interrupted save leaves the previous one intact."""
        with atomic_dir(directory) as tmp:
            self.write_files(tmp, **kwargs)

    def write_files(self, folder: Path, **kwargs: Any) -> None:
        """The files of ``save_pretrained``, written into an existing (temporary) folder; for writers
        that add files of their own (training state) before one atomic swap."""
        atomic_write_json(Path(folder) / CONFIG_NAME, self.config.to_dict())
        save_file(self.head_state_dict(), str(Path(folder) / HEADS_NAME), metadata={"kind": self.kind})
        self._write_extra(Path(folder), **kwargs)

    def _write_extra(self, folder: Path, **kwargs: Any) -> None:
        """What this kind saves besides the config and the heads."""

    # -- load -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: Any = None, dtype: Any = None,
                        **kwargs: Any) -> "ExitModelBase":
        """Load what ``save_pretrained`` wrote; a folder of another kind gets an error naming it.
        ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a torch device) and ``dtype`` (a
        ``--dtype`` name or a torch dtype) move the loaded model; None leaves it where it loads (the
        CPU, or the given backbone's device), in float32. A device this machine lacks is an error
        before anything is read."""
        dev = resolve_device(device) if device is not None else None
        if isinstance(dtype, str):
            dtype = resolve_dtype(dtype, dev or "cpu")
        folder = cls._resolve(readable_dir(directory))
        _, data = read_config(folder, expect=cls.kind)
        try:
            config = cls.config_class.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{folder / CONFIG_NAME}: {e}; the checkpoint is damaged or was edited by hand; "
                             f"{cls.fix}") from None
        parts = cls._parts(folder, config, **kwargs)
        cls._check_head_shapes(folder, parts)
        model = cls(*parts)
        model.load_heads(folder)
        if dev is not None or dtype is not None:
            model.to(device=dev, dtype=dtype)
        return model.eval()

    @classmethod
    def _check_head_shapes(cls, folder: Path, parts: tuple) -> None:
        """Build the heads ``parts`` describe on the meta device (no memory) and compare their shapes
        with those stored in the heads file's header, so that a crafted size in the config (10^7
        labels, a 10^7-wide confidence layer) is an error before anything is allocated."""
        import torch

        path = next((folder / n for n in (HEADS_NAME, *cls.legacy_heads) if (folder / n).is_file()), None)
        if path is None:
            raise ValueError(f"{folder} has no {HEADS_NAME}: it is not a complete offramp checkpoint; {cls.fix}")
        stored = stored_shapes(path, "exit heads", cls.fix)
        with torch.device("meta"):
            shell = cls(*parts)
        wanted = {k: tuple(v.shape) for k, v in shell.state_dict().items() if not k.startswith("backbone.")}
        wrong = [f"{k} {stored[k]} (the config asks for {wanted[k]})" for k in wanted if k in stored
                 and stored[k] != wanted[k]]
        if wrong:
            raise ValueError(f"{path}: head shapes do not match {CONFIG_NAME}: {'; '.join(wrong[:3])}"
                             f"{' ...' if len(wrong) > 3 else ''}. The heads and the config come from different "
                             f"checkpoints (or another backbone), or the config was edited; {cls.fix}")

    @classmethod
    def _resolve(cls, folder: Path) -> Path:
        """The checkpoint folder to read, given the folder a user named."""
        return folder

    @classmethod
    def _parts(cls, folder: Path, config: Any, **kwargs: Any) -> tuple:
        """The arguments of ``cls(...)`` for a saved ``config`` (the backbone loaded)."""
        raise NotImplementedError

    def load_heads(self, directory: str | os.PathLike) -> None:
        """Load the exits' tensors saved in ``directory`` into this model (shapes and names checked)."""
        directory = Path(directory)
        path = next((directory / n for n in (HEADS_NAME, *self.legacy_heads) if (directory / n).is_file()), None)
        if path is None:
            raise ValueError(f"{directory} has no {HEADS_NAME}: it is not a complete offramp checkpoint; {self.fix}")
        device = next(iter(self.state_dict().values())).device if self.state_dict() else "cpu"
        state = load_safetensors(path, "exit heads", self.fix, device=str(device))
        wrong = shape_mismatches(self, state)
        if wrong:
            raise ValueError(f"{path}: head shapes do not match {CONFIG_NAME}: {'; '.join(wrong[:3])}"
                             f"{' ...' if len(wrong) > 3 else ''}. The heads and the config come from different "
                             f"checkpoints (or another backbone); {self.fix}")
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"{directory}: heads do not match the config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); the checkpoint is damaged or from another version; "
                             f"{self.fix}")
