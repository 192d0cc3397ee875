"""Shared fixtures: float64 for gradient checks, the chapter's PyTorch reference."""
import contextlib
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


@pytest.fixture(scope="session")
def mock_cifar10():
    """A context manager factory: ``with mock_cifar10(num_examples=40): ...`` fakes CIFAR-10.

    Inside it, ``tfds.data_source('cifar10', ...)`` (with the default data dir) serves
    ``num_examples`` random examples from ``tfds.testing.mock_data``; a factory, so
    fixtures of any scope can use it. It fills two gaps of tfds 4.9.10's mock:
    ``is_prepared()`` stays False, and the mocked ArrayRecord ``__getitems__`` is
    unbound (a TypeError), so batched reads fall back to one-by-one reads.
    """
    tfds = pytest.importorskip("tensorflow_datasets")  # e.g. on a device machine, which has no TFDS
    from tensorflow_datasets.core.data_sources import base

    @contextlib.contextmanager
    def mock(num_examples):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
            patch.setattr(base.BaseDataSource, "__getitems__", lambda self, keys: [self[k] for k in keys])
            # USE_CODE: features come from the cifar10 builder class, no metadata files needed.
            with tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
                yield

    return mock
