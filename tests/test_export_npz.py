"""The .npz export of CIFAR-10 and reading it back without TFDS."""
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.cifar10 import export_npz
from experiments.cifar10 import input_pipeline as ip

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tfds"


def test_export_round_trip_reads_without_tfds(mock_cifar10, tmp_path, monkeypatch):
    with mock_cifar10(num_examples=30):
        written = export_npz.export(None, tmp_path, {"train": 12, "test": None})
        originals = {split: ip.load_split(split) for split in ("train", "test")}
    assert set(written) == {"train", "test"}
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # any TFDS import now fails
    for split, limit in (("train", 12), ("test", 30)):
        loaded, original = ip.load_split(split, data_dir=tmp_path), originals[split]
        assert len(loaded) == limit
        np.testing.assert_array_equal(loaded.images, original.images[:limit])
        np.testing.assert_array_equal(loaded.labels, original.labels[:limit])
        np.testing.assert_array_equal(loaded.ids, original.ids[:limit])
        assert loaded.images.dtype == np.uint8 and loaded.labels.dtype == np.int32
    assert len(ip.load_split("train", data_dir=tmp_path, limit=5)) == 5


def test_export_of_the_exact_test_images(tmp_path):
    if not (REAL_DATA / "cifar10").is_dir():
        pytest.skip(f"no prepared CIFAR-10 at {REAL_DATA}")
    export_npz.main(["--data-dir", str(REAL_DATA), "--out", str(tmp_path), "--train-limit", "50",
                     "--exact-test-only"])
    test = ip.load_split("test", data_dir=tmp_path)
    assert len(test) == 1000 and ip.exact_test_mask(test.ids).all()
    assert len(ip.load_split("train", data_dir=tmp_path)) == 50


def test_a_foreign_npz_is_refused(tmp_path):
    np.savez(tmp_path / "train.npz", images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(2))
    with pytest.raises(ValueError, match="lacks \\['ids'\\]"):
        ip.load_split("train", data_dir=tmp_path)
    np.savez(tmp_path / "train.npz", images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(2), ids=np.array(["a", "b"]))
    with pytest.raises(ValueError, match="expected uint8 images"):
        ip.load_split("train", data_dir=tmp_path)
