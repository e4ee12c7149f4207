"""Shared test helpers. The one place that finds ``../shared`` (real data and parity fixtures)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_ENV = "CROSSMAE_SHARED"
# the command index (crossmae.command_index) of the tests' commands, theirs alone and removed after
os.environ["CROSSMAE_CACHE_DIR"] = tempfile.mkdtemp(prefix="crossmae-test-index-")
atexit.register(shutil.rmtree, os.environ["CROSSMAE_CACHE_DIR"], ignore_errors=True)


def shared_root() -> Path:
    """``$CROSSMAE_SHARED`` if set, else ``../shared`` beside the repository."""
    return Path(os.environ.get(SHARED_ENV, REPO.parent / "shared")).resolve()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder; skipped when absent, except under CI (CI=true), where that fails."""
    root = shared_root()
    if not (root / "fixtures").is_dir() or not (root / "data").is_dir():
        msg = f"shared folder (fixtures/, data/) not found at {root}; set {SHARED_ENV} to it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture
def float64():
    """Run a test with float64 as the default dtype (parity tests need it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def tiny_encoder_export(path: Path, name: str = "crossmae_vit_base_patch16", **widths):
    """A tiny pretraining model (seed 0, 32-px input, a 1-block 16-wide decoder, the encoder
    ``widths``) whose encoder export is written to ``path``; returns the model."""
    from crossmae.checkpoint import save_atomic
    from crossmae.models import create_model
    from crossmae.models.pretrained import encoder_export

    torch.manual_seed(0)
    model = create_model(
        name, img_size=32, decoder_embed_dim=16, decoder_num_heads=2, decoder_depth=1, **widths
    )
    save_atomic(encoder_export(model, model_name=name), path)
    return model


def check_random_states(checkpoint: Path) -> None:
    """A task checkpoint holds every process's random streams: torch CPU, each CUDA device's
    (as many as this machine has), numpy's and Python's."""
    ck = torch.load(checkpoint, weights_only=True)
    assert ck["rng"], "no random states saved"
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for state in ck["rng"]:
        assert set(state) == {"torch", "cuda", "numpy", "python"}
        assert len(state["cuda"]) == cuda


def parity_fixture(request, env: str, name: str) -> Path:
    """A parity file: ``$env`` when set (another file of the same format), else ``name`` in the
    shared fixtures folder (skipped or failed as ``shared_dir`` is)."""
    path = os.environ.get(env)
    return Path(path) if path else request.getfixturevalue("shared_dir") / "fixtures" / name
