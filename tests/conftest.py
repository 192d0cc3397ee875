"""Shared fixtures: float64 for gradient checks, the chapter's PyTorch reference; one compilation cache per run."""
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference" / "seed_deq_torch.py"


CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = pytest.StashKey[str]()  # the cache folder this run created (and removes)


def pytest_configure(config):
    """Every test and every subprocess of one run share a persistent compilation cache.

    The suite's cost is compilation: tests, benchmarks' quick modes and the experiment's
    subprocesses build many identical programs (JAX keys the cache by program and
    compiler, so only identical ones are reused). The first process to configure (pytest
    itself, or xdist's controller before it starts its workers) creates a fresh folder and
    exports it; workers and subprocesses inherit the variable. A cache the user set is
    used as it is and kept.
    """
    _set_test_compile_flags()
    if CACHE_VARIABLE not in os.environ:
        os.environ[CACHE_VARIABLE] = tempfile.mkdtemp(prefix="deq_jax_tests_jax_cache_")
        config.stash[_OWN_CACHE] = os.environ[CACHE_VARIABLE]
    # 0.2 s rather than JAX's default 1 s, so that mid-sized programs are kept too (a choice, not a measured optimum).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_VARIABLE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def _set_test_compile_flags():
    """Tests compile with XLA's backend optimisation level 1 and, where XLA has them, XLA:CPU's classic fusion emitters.

    Set before any backend starts, so workers and subprocesses inherit them; left alone if
    XLA_FLAGS already sets a level (the user's choice, or the first pytest process's, which
    xdist's workers inherit). On XLA:CPU most of a test's time is compiling, and a test runs
    each program on a few small arrays once or twice.

    - The level is LLVM's: the optimised HLO of a DEQ gradient program is the same text at
      levels 0 and 3 (compared with ``compiled.as_text()``). On a 2-core AMD EPYC
      (2026-12-03): ``pytest -n 0 tests/test_conv.py`` took 86 s at the default level, 22 s
      at level 1 and 22 s at level 0; the mocked MDEQ run's settings on real data
      (``train.train_and_evaluate`` in one process, as ``python -m experiments.cifar10
      --model mdeq-tiny --epochs 2 --train-limit 30 --eval-limit 25 --batch-size 10
      --f-max-iter 4 --b-max-iter 4 --warmup-steps 4 --warmup-depth 2``) took 98 s, 74 s
      and 171 s: level 0 compiles fastest but runs many small fused ops ten times slower.
    - ``--xla_cpu_use_fusion_emitters=false``: XLA:CPU's default MLIR fusion emitters cost
      more to compile than the classic ones. CPU seconds (user + sys) of ``pytest -n 0
      -p no:cacheprovider FILE`` at level 1, same machine (2026-12-06), default -> classic:
      tests/test_forward_mode.py 49.9 -> 35.1 s, tests/test_mdeq_deq.py 92.2 -> 70.6 s,
      tests/test_cifar10_train.py (mostly running the mocked trainings) 147.6 -> 132.7 s;
      every test passes either way. jaxlib 0.11.2 no longer has the flag, and XLA aborts
      on a flag it does not know, so a subprocess (1.1 s) tries it first.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" in flags:
        return
    flags = f"{flags} --xla_backend_optimization_level=1".strip()
    classic = f"{flags} --xla_cpu_use_fusion_emitters=false"
    os.environ["XLA_FLAGS"] = classic if _xla_accepts(classic) else flags


def _xla_accepts(flags: str) -> bool:
    """Whether a JAX process with ``XLA_FLAGS=flags`` starts its CPU backend (XLA aborts on an unknown flag)."""
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1)"], capture_output=True,
                           env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})
    return probe.returncode == 0


def pytest_unconfigure(config):
    own = config.stash.get(_OWN_CACHE, None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)
        del os.environ[CACHE_VARIABLE]


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
def write_cifar_parts():
    """A function ``write(folder, train=N, test=M)``: random CIFAR-10-shaped splits as ``export_npz`` parts.

    The folder is created and is a valid ``--data-dir``; ids are ``<split>_NNNNN``.
    """
    from experiments.cifar10 import export_npz
    from experiments.cifar10 import input_pipeline as ip

    def write(folder: Path, *, train: int, test: int) -> Path:
        folder.mkdir()
        rng = np.random.default_rng(0)
        for split, n in (("train", train), ("test", test)):
            images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            ids = np.array([f"{split}_{i:05d}" for i in range(n)])
            export_npz.write_parts(ip.Split(images, rng.integers(0, 10, n).astype(np.int32), ids), folder, split, None)
        return folder

    return write


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
