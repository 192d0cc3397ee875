"""Shared fixtures: float64 for gradient checks, the chapter's PyTorch reference."""
import importlib.util
from pathlib import Path

import jax
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference" / "seed_deq_torch.py"


@pytest.fixture
def x64():
    """Runs a test with 64-bit floats, as finite-difference checks need."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def torch_reference():
    """The chapter's PyTorch module, or a skip where torch or ../shared is absent."""
    pytest.importorskip("torch")
    if not REFERENCE.exists():
        pytest.skip(f"the chapter's reference code is not at {REFERENCE}")
    spec = importlib.util.spec_from_file_location("seed_deq_torch", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
