"""The .npz export of CIFAR-10 in parts, and reading it back without TFDS."""
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.cifar10 import export_npz
from experiments.cifar10 import input_pipeline as ip

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tfds"
SMALL_PART_MIB = 0.05  # 52 KiB: 14 examples of ~3 KiB, so 30 examples make 3 parts


@pytest.fixture
def parts(mock_cifar10, tmp_path):
    """30 fake train and test examples exported in parts; returns (folder, originals)."""
    with mock_cifar10(num_examples=30):
        originals = {split: ip.load_split(split) for split in ("train", "test")}
        export_npz.export(None, tmp_path, {"train": None, "test": None}, max_part_mib=SMALL_PART_MIB)
    return tmp_path, originals


def _assert_same(loaded, original):
    for name in ("images", "labels", "ids"):
        got, expected = getattr(loaded, name), getattr(original, name)
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected)


def _names(folder, split="train"):
    return [p.name for p in ip.find_parts(folder, split)]


def test_export_in_parts_round_trip_without_tfds(parts, monkeypatch):
    folder, originals = parts
    assert _names(folder) == [f"train-0000{i}-of-00003.npz" for i in range(3)]
    assert all(p.stat().st_size <= SMALL_PART_MIB * 2**20 for p in folder.iterdir())
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # any TFDS import now fails
    for split in ("train", "test"):
        _assert_same(ip.load_split(split, data_dir=folder), originals[split])
    # 20 crosses from the second part into the third.
    for limit in (5, 20, 30, 1000):
        loaded = ip.load_split("train", data_dir=folder, limit=limit)
        assert len(loaded) == min(limit, 30)
        _assert_same(loaded, ip.Split(*(getattr(originals["train"], k)[:limit] for k in ("images", "labels", "ids"))))


def test_export_prints_each_part(mock_cifar10, tmp_path, capsys):
    with mock_cifar10(num_examples=30):
        export_npz.export(None, tmp_path, {"test": None}, max_part_mib=SMALL_PART_MIB)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("test: test-00000-of-00003.npz  examples 0..13 (14), ")
    assert [line.split()[1] for line in lines] == _names(tmp_path, "test")


def test_export_of_real_data_in_parts_is_bit_exact(tmp_path):
    if not (REAL_DATA / "cifar10").is_dir():
        pytest.skip(f"no prepared CIFAR-10 at {REAL_DATA}")
    max_mib = 0.25  # 81 examples a part
    export_npz.main(["--data-dir", str(REAL_DATA), "--out", str(tmp_path), "--max-part-mib", str(max_mib),
                     "--train-limit", "250", "--test-limit", "120"])
    assert len(_names(tmp_path)) == 4 and len(_names(tmp_path, "test")) == 2
    assert all(p.stat().st_size <= max_mib * 2**20 for p in tmp_path.iterdir())
    for split, limit in (("train", 250), ("test", 120), ("train", 100)):
        _assert_same(ip.load_split(split, data_dir=tmp_path, limit=limit),
                     ip.load_split(split, data_dir=REAL_DATA, limit=limit))


def test_export_of_the_exact_test_images(tmp_path):
    if not (REAL_DATA / "cifar10").is_dir():
        pytest.skip(f"no prepared CIFAR-10 at {REAL_DATA}")
    export_npz.main(["--data-dir", str(REAL_DATA), "--out", str(tmp_path), "--train-limit", "50",
                     "--exact-test-only"])
    assert _names(tmp_path, "test") == ["test-00000-of-00001.npz"]
    test = ip.load_split("test", data_dir=tmp_path)
    assert len(test) == 1000 and ip.exact_test_mask(test.ids).all()
    assert len(ip.load_split("train", data_dir=tmp_path)) == 50


def test_export_again_replaces_the_earlier_parts(parts, mock_cifar10):
    folder, originals = parts
    with mock_cifar10(num_examples=30):
        export_npz.export(None, folder, {"train": 20})
    assert _names(folder) == ["train-00000-of-00001.npz"]
    assert len(_names(folder, "test")) == 3  # not exported again, so kept
    _assert_same(ip.load_split("train", data_dir=folder), ip.load_split("train", data_dir=folder, limit=20))
    assert len(ip.load_split("train", data_dir=folder)) == 20


def test_parts_of_incompressible_data_keep_to_the_limit(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data = ip.Split(rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 100, dtype=np.int32),
                    np.array([f"train_{i:05d}" for i in range(100)]))
    paths = export_npz.write_parts(data, tmp_path, "train", 100_000)
    sizes = [p.stat().st_size for p in paths]
    assert len(paths) == 4 and max(sizes) <= 100_000 and sizes[0] > 90_000, sizes
    _assert_same(ip.load_split("train", data_dir=tmp_path), data)
    # A part over the limit (here from a miscount) is caught on disk.
    monkeypatch.setattr(export_npz, "rows_per_part", lambda data, max_bytes: 40)
    with pytest.raises(RuntimeError, match="over the limit of 100000"):
        export_npz.write_parts(data, tmp_path, "train", 100_000)


def test_a_part_too_small_for_one_example(parts):
    folder, originals = parts
    with pytest.raises(ValueError, match="cannot hold one example"):
        export_npz.write_parts(originals["train"], folder, "train", 10_000)


# Reading parts that do not form one export.


def test_parts_past_the_limit_are_not_opened(parts):
    folder, _ = parts
    (folder / "train-00002-of-00003.npz").write_bytes(b"cut short in transfer")
    assert len(ip.load_split("train", data_dir=folder, limit=28)) == 28
    with pytest.raises(ValueError, match="train-00002-of-00003.npz cannot be read as an npz file.*copy it again"):
        ip.load_split("train", data_dir=folder)


def test_a_missing_part(parts):
    folder, _ = parts
    (folder / "train-00001-of-00003.npz").unlink()
    with pytest.raises(FileNotFoundError, match="lacks 1 of the 3 train parts: train-00001-of-00003.npz"):
        ip.load_split("train", data_dir=folder, limit=3)


def test_parts_with_different_counts(parts):
    folder, _ = parts
    shutil.copy(folder / "train-00000-of-00003.npz", folder / "train-00000-of-00002.npz")
    with pytest.raises(ValueError, match="mixes train parts of different exports \\(-of- counts \\[2, 3\\]\\)"):
        ip.load_split("train", data_dir=folder)


def test_a_part_index_past_the_count(parts):
    folder, _ = parts
    shutil.copy(folder / "train-00000-of-00003.npz", folder / "train-00003-of-00003.npz")
    with pytest.raises(ValueError, match="indices \\[0, 1, 2, 3\\] go past -of-00003"):
        ip.load_split("train", data_dir=folder)


def test_parts_of_two_exports_with_the_same_count(parts, mock_cifar10, tmp_path_factory):
    folder, _ = parts
    other = tmp_path_factory.mktemp("other")
    with mock_cifar10(num_examples=30):
        export_npz.export(None, other, {"train": 29}, max_part_mib=SMALL_PART_MIB)  # also 3 parts
    shutil.copy(other / "train-00002-of-00003.npz", folder)
    assert len(ip.load_split("train", data_dir=folder, limit=28)) == 28
    with pytest.raises(ValueError, match="holds examples from 28 of 29, expected from 28 of 30"):
        ip.load_split("train", data_dir=folder)


def test_a_foreign_npz_is_refused(tmp_path):
    path = tmp_path / ip.part_name("train", 0, 1)
    np.savez(path, images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(2))
    with pytest.raises(ValueError, match="lacks \\['first', 'ids', 'total'\\]"):
        ip.load_split("train", data_dir=tmp_path)
    np.savez(path, images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(2), ids=np.array(["a", "b"]),
             first=0, total=2)
    with pytest.raises(ValueError, match="expected uint8 images"):
        ip.load_split("train", data_dir=tmp_path)


def test_find_parts_ignores_other_files(tmp_path):
    for name in ("train-00001-of-00002.npz", "train-00000-of-00002.npz", "test-00000-of-00001.npz",
                 "train.npz", "train-1-of-2.npz", "xtrain-00000-of-00001.npz"):
        (tmp_path / name).touch()
    assert _names(tmp_path) == ["train-00000-of-00002.npz", "train-00001-of-00002.npz"]
    assert ip.find_parts(tmp_path / "nowhere", "train") == []
