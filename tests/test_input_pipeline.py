"""CIFAR-10 input pipeline: loading (mocked and real), batching, augmentation, errors."""

import io
import re
import socket
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from experiments.cifar10 import input_pipeline as ip

tfds = pytest.importorskip("tensorflow_datasets")  # e.g. on a device machine, which has no TFDS

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tfds"


@pytest.fixture
def mock_cifar(mock_cifar10):
    """Fake CIFAR-10 with 40 examples (see ``mock_cifar10`` in conftest.py)."""
    with mock_cifar10(num_examples=40):
        yield


@pytest.fixture(scope="module")
def real_data():
    if not (REAL_DATA / "cifar10").is_dir():
        pytest.skip(f"no prepared CIFAR-10 at {REAL_DATA}")
    return REAL_DATA


def _split(n):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
    return ip.Split(images, np.arange(n, dtype=np.int32), None)


# Loading.


@pytest.mark.parametrize("limit, expected", [(None, 40), (7, 7), (1000, 40)])
def test_load_split_mocked(mock_cifar, limit, expected):
    s = ip.load_split("train", limit=limit)
    assert s.images.shape == (expected, 32, 32, 3) and s.images.dtype == np.uint8
    assert s.labels.shape == (expected,) and s.labels.dtype == np.int32
    assert s.ids.shape == (expected,) and isinstance(s.ids[0], str)
    assert len(s) == expected


def test_load_split_real(real_data):
    train = ip.load_split("train", data_dir=real_data, limit=300)
    test = ip.load_split("test", data_dir=real_data, limit=1200)
    assert train.images.shape == (300, 32, 32, 3) and test.images.shape == (1200, 32, 32, 3)
    for s in (train, test):
        assert s.images.dtype == np.uint8 and s.labels.dtype == np.int32
        assert s.labels.min() >= 0 and s.labels.max() <= 9
    assert all(i.startswith("train_") for i in train.ids)
    mask = ip.exact_test_mask(test.ids)
    assert np.array_equal(mask, np.array([int(i[5:]) < 1000 for i in test.ids]))
    assert 0 < mask.sum() < 1200
    assert not ip.exact_test_mask(train.ids).any()
    mean = ip.normalize(train.images).mean(axis=(0, 1, 2), dtype=np.float64)
    assert np.all((mean > 0.3) & (mean < 0.6)), mean


def test_exact_test_mask():
    ids = np.array(["test_00000", "test_00999", "test_01000", "train_00001", "test_09999"])
    assert ip.exact_test_mask(ids).tolist() == [True, True, False, False, False]


def test_normalize():
    x = ip.normalize(np.array([0, 51, 255], np.uint8))
    assert x.dtype == np.float32 and np.allclose(x, [0.0, 0.2, 1.0])
    pixels = np.arange(256, dtype=np.uint8).repeat(3).reshape(-1, 1, 1, 3)
    want = (pixels / 255 - np.array(ip.MDEQ_MEAN)) / np.array(ip.MDEQ_STD)
    for scaling, expected in (("unit", pixels / 255), ("mean-std", want)):
        np.testing.assert_allclose(ip.normalize(pixels, scaling), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="scaling must be one of"):
        ip.normalize(pixels, "z-score")


# Bad input.


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ip.load_split("train", data_dir=missing)


def test_unprepared_data_dir(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match="CIFAR-10 was not found in data_dir .*no train-NNNNN-of-NNNNN.npz parts.*"
        "no prepared TFDS copy.*Pass --data-dir.*export_npz",
    ):
        ip.load_split("train", data_dir=tmp_path)


def test_unprepared_default_dir_without_tensorflow(tmp_path, monkeypatch):
    # TFDS would download 160 MB before finding out it needs TensorFlow; we stop first.
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))
    monkeypatch.setattr(ip, "_tensorflow_installed", lambda: False)
    with pytest.raises(
        FileNotFoundError, match="default data dir.*needs TensorFlow.*tensorflow-cpu"
    ):
        ip.load_split("train")
    assert not any(tmp_path.iterdir())  # nothing downloaded or created


def test_unprepared_default_dir_without_network(tmp_path, monkeypatch):
    # With TensorFlow there, TFDS would retry the download for minutes; a probe stops first.
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))
    monkeypatch.setattr(ip, "_tensorflow_installed", lambda: True)

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: pytest.fail("TFDS was asked to download"))
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        ip.load_split("train")
    assert time.monotonic() - start < ip._PROBE_TIMEOUT_S
    message = str(error.value)
    assert "\n" not in message
    assert re.search("default data dir.*cannot download.*out of reach.*Pass --data-dir.*export_npz", message)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("empty_data_dir, match", [
    (False, "default data dir \\(tensorflow_datasets.*is not installed\\)"),
    (True, "no train-NNNNN-of-NNNNN.npz parts.*and tensorflow_datasets.*is not installed"),
])
def test_without_tensorflow_datasets(tmp_path, monkeypatch, empty_data_dir, match):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # any TFDS import now fails
    with pytest.raises(FileNotFoundError, match=f"{match}.*Pass --data-dir.*export_npz"):
        ip.load_split("train", data_dir=tmp_path if empty_data_dir else None)


@pytest.mark.parametrize("response, answered", [
    (urllib.error.URLError("no route"), False),
    (urllib.error.HTTPError(ip._DOWNLOAD_URL, 403, "Forbidden", {}, None), True),  # the server is there
    (None, True),
])
def test_can_download(monkeypatch, response, answered):
    def urlopen(request, timeout):
        assert request.get_method() == "HEAD" and request.full_url == ip._DOWNLOAD_URL
        if response is not None:
            raise response
        return io.BytesIO()  # anything with close()

    monkeypatch.setattr(ip.urllib.request, "urlopen", urlopen)
    assert ip._can_download() is answered


def test_can_download_gives_up_on_a_hanging_network(monkeypatch):
    monkeypatch.setattr(ip, "_PROBE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(ip.urllib.request, "urlopen", lambda request, timeout: time.sleep(3) or io.BytesIO())
    start = time.monotonic()
    assert not ip._can_download()
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("limit", [0, -3, 2.5, True, "10"])
def test_bad_limit(limit):
    with pytest.raises(ValueError, match="limit"):
        ip.load_split("train", data_dir="/nonexistent", limit=limit)


@pytest.mark.parametrize(
    "features, match",
    [
        ({"image": tfds.features.Image(shape=(32, 32, 3))}, "missing \\['label'\\]"),
        (
            {
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            },
            "expected uint8 images of shape \\(32, 32, 3\\), found uint8 \\(28, 28, 1\\)",
        ),
    ],
)
def test_check_features(features, match):
    with pytest.raises(ValueError, match=match):
        ip._check_features(tfds.features.FeaturesDict(features))


# Batching.


def test_epoch_batches_shuffled_covers_every_example_once():
    s = _split(103)
    batches = list(ip.epoch_batches(s, 10, rng=np.random.default_rng(0), drop_remainder=False))
    labels = np.concatenate([b[1] for b in batches])
    assert sorted(labels.tolist()) == list(range(103)) and labels.tolist() != list(range(103))
    assert all(np.all(im[:, 0, 0, 0] == lab.astype(np.uint8)) for im, lab in batches)
    assert [len(b[1]) for b in batches] == [10] * 10 + [3]
    assert len(batches) == ip.steps_per_epoch(103, 10, drop_remainder=False) == 11


def test_epoch_batches_drop_remainder_and_order():
    s = _split(103)
    train = list(ip.epoch_batches(s, 10, rng=np.random.default_rng(1), drop_remainder=True))
    assert len(train) == ip.steps_per_epoch(103, 10) == 10
    assert all(im.shape == (10, 32, 32, 3) for im, _ in train)
    ordered = np.concatenate(
        [lab for _, lab in ip.epoch_batches(s, 10, rng=None, drop_remainder=False)]
    )
    assert ordered.tolist() == list(range(103))


def test_epoch_batches_rows_are_each_process_share_of_the_same_batches():
    s = _split(103)
    whole = list(ip.epoch_batches(s, 10, rng=np.random.default_rng(2), drop_remainder=False))
    shares = [list(ip.epoch_batches(s, 10, rng=np.random.default_rng(2), drop_remainder=False, rows=rows))
              for rows in (slice(0, 4), slice(4, 8), slice(8, 10))]
    for i, (images, labels) in enumerate(whole):
        assert np.array_equal(np.concatenate([share[i][1] for share in shares]), labels)
        assert np.array_equal(np.concatenate([share[i][0] for share in shares]), images)
    assert [len(share[-1][1]) for share in shares] == [3, 0, 0]  # the short last batch's rows 0..2


def test_augment_of_rows_is_those_rows_of_the_whole_batch_augmented():
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    whole = ip.augment(images, np.random.default_rng(3))
    rows = slice(4, 8)
    part = ip.augment(images[rows], np.random.default_rng(3), rows=rows, batch_size=12)
    assert np.array_equal(part, whole[rows])
    assert not np.array_equal(part, ip.augment(images[rows], np.random.default_rng(3)))
    with pytest.raises(ValueError, match="are not the rows"):
        ip.augment(images[:3], np.random.default_rng(3), rows=rows, batch_size=12)


def test_pad_batch():
    images, labels = _split(3).images, np.array([4, 5, 6], np.int32)
    padded, plabels, mask = ip.pad_batch(images, labels, 5)
    assert padded.shape == (5, 32, 32, 3) and padded.dtype == np.uint8
    assert np.array_equal(padded[:3], images) and not padded[3:].any()
    assert plabels.tolist() == [4, 5, 6, 0, 0] and mask.tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError):
        ip.pad_batch(images, labels, 2)


# Augmentation.


def test_augment_shape_dtype_determinism():
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    a = ip.augment(images, np.random.default_rng(5))
    assert a.shape == images.shape and a.dtype == np.uint8
    assert np.array_equal(a, ip.augment(images, np.random.default_rng(5)))
    assert not np.array_equal(a, ip.augment(images, np.random.default_rng(6)))


def test_augment_is_a_zero_filled_translation_maybe_mirrored():
    # Pixels 1..255, so zero fill and every shift are distinguishable.
    image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    candidates = {}
    for dy in range(9):
        for dx in range(9):
            crop = padded[dy : dy + 32, dx : dx + 32]
            candidates[crop.tobytes()] = (dy, dx, False)
            candidates[crop[:, ::-1].tobytes()] = (dy, dx, True)
    out = ip.augment(np.repeat(image[None], 2000, axis=0), np.random.default_rng(0))
    found = [candidates.get(o.tobytes()) for o in out]
    assert None not in found  # each output is one crop of the padded image, maybe mirrored
    assert (4, 4, True) in found  # flipped, not shifted: exactly the mirror image
    assert np.array_equal(out[found.index((4, 4, True))], image[:, ::-1])
    assert {f[2] for f in found} == {False, True}
    assert {f[:2] for f in found} == {(dy, dx) for dy in range(9) for dx in range(9)}
