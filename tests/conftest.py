"""Fixtures every test folder shares; the models and batches they build live in tests/helpers."""

from __future__ import annotations

import pytest
import torch
from encoders import ENCODERS, build_encoder


def pytest_collection_modifyitems(config, items) -> None:
    """The ``gpu`` tests need a CUDA GPU: without one they are skipped, and the summary says why."""
    if torch.cuda.is_available():
        return
    why = (f"no CUDA GPU here (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): "
           "benchmarks/device_check.sh runs these on a machine with one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session", params=ENCODERS)
def encoder(request) -> tuple[str, torch.nn.Module]:
    return request.param, build_encoder(request.param).eval()


@pytest.fixture(scope="session")
def tiny_bert() -> torch.nn.Module:
    return build_encoder("bert").eval()


@pytest.fixture(autouse=True, scope="session")
def _private_state_cache(tmp_path_factory):
    """The backbone-state cache of the whole run lives in a temporary folder, never in the user's
    cache (the real default stays reachable as ``default_root.__wrapped__``)."""
    import offramp.modeling.state_cache as sc

    root = tmp_path_factory.mktemp("states")
    original = sc.default_root

    def private() -> object:
        return root

    private.__wrapped__ = original
    sc.default_root = private
    yield root
    sc.default_root = original
