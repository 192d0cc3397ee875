"""CIFAR-10 input pipeline: TFDS data source into memory, numpy batching and augmentation.

The whole dataset is 180 MB as uint8, so it is decoded once into host memory and
batched with numpy; no TensorFlow is needed to read it. A data dir may instead hold
parts such as ``train-00000-of-00003.npz`` exported by
``python -m experiments.cifar10.export_npz``; those are read without TFDS (for machines
that lack it). Nothing here imports JAX, so every data error surfaces before anything
compiles.

Example::

    train = load_split("train", data_dir="../shared/data/tfds")
    rng = np.random.default_rng(0)
    for images, labels in epoch_batches(train, 100, rng=rng, drop_remainder=True):
        x = normalize(augment(images, rng))  # float32 [100, 32, 32, 3] in [0, 1]
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import threading
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import BadInputError, MissingError

_DATASET = "cifar10"
# `tfds.data_source` needs a random-access format. It picks array_record by
# itself only when no data_dir is given, so it is always asked for explicitly.
_BUILDER_KWARGS = {"file_format": "array_record"}
_IMAGE_SHAPE = (32, 32, 3)
_CROP_PADDING = 4
_NUM_EXACT_TEST = 1000  # test_00000..test_00999 are bit-exact (data/README.md)
_READ_CHUNK = 1000  # per batched read (2x faster than one-by-one) and progress update
_PROGRESS_MIN = 5000  # a progress bar only for loads of a second or more
_DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"  # TFDS's cifar10 source
_PROBE_TIMEOUT_S = 5.0
# An exported part: the split's rows [first, first + N) of `total`, as written by export_npz.
_PART_ARRAYS = ("images", "labels", "ids", "first", "total")


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of CIFAR-10, held in memory.

    Attributes:
        images: uint8 [N, 32, 32, 3].
        labels: int32 [N], class indices in 0..9.
        ids: str [N] such as 'test_00042', or None when the dataset has no `id`.
    """

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray | None

    def __len__(self) -> int:
        return len(self.labels)


def load_split(
    split: str, *, data_dir: str | Path | None = None, limit: int | None = None
) -> Split:
    """Reads a CIFAR-10 split into memory through `tfds.data_source`, or from an export.

    Args:
        split: a TFDS split name, e.g. 'train' or 'test'.
        data_dir: a folder holding a prepared copy (`cifar10/3.0.2/...` in array_record
            format), or the parts `<split>-NNNNN-of-NNNNN.npz` written by `export_npz`
            (read without TFDS, which then need not be installed). None uses TFDS's
            default data dir (TFDS_DATA_DIR or ~/tensorflow_datasets), where TFDS
            downloads and prepares CIFAR-10 if TensorFlow and the network are there.
        limit: read only the first `limit` examples (all if the split is smaller);
            None reads the whole split. Parts past the limit are not opened.

    Returns:
        A `Split` with uint8 images, int32 labels and str ids.

    Raises:
        BadInputError: `limit` is not a positive int, the dataset's features are not
            CIFAR-10's, or exported parts are unreadable or come from different exports.
        MissingError: no CIFAR-10 where asked: `data_dir` is missing or holds neither
            a prepared copy nor parts (or only parts with one missing); or, with data_dir
            None, the default data dir has none and TFDS cannot get it (no TensorFlow,
            no tensorflow_datasets, or no network). Its message says what to pass.

    Example:
        >>> test = load_split("test", data_dir="/tmp/cifar_parts", limit=100)  # doctest: +SKIP
        >>> test.images.shape  # doctest: +SKIP
        (100, 32, 32, 3)
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise BadInputError(f"limit must be a positive int or None, got {limit!r}")
    parts = [] if data_dir is None else find_parts(data_dir, split)
    if parts:
        return _load_parts(parts, split, limit)
    source = _open_source(split, data_dir)
    features = source.dataset_info.features
    _check_features(features)
    n = len(source) if limit is None else min(limit, len(source))
    images = np.empty((n, *_IMAGE_SHAPE), np.uint8)
    labels = np.empty((n,), np.int32)
    ids = [] if "id" in features else None
    with tqdm(total=n, desc=f"{_DATASET} {split}", unit="img", disable=n < _PROGRESS_MIN) as bar:
        for start in range(0, n, _READ_CHUNK):
            stop = min(start + _READ_CHUNK, n)
            # A batched read: __getitems__ is a method of TFDS's public DataSource protocol, not an internal.
            examples = source.__getitems__(range(start, stop))
            images[start:stop] = [ex["image"] for ex in examples]
            labels[start:stop] = [ex["label"] for ex in examples]
            if ids is not None:
                ids.extend(_as_str(ex["id"]) for ex in examples)
            bar.update(stop - start)
    return Split(images, labels, None if ids is None else np.array(ids, dtype=str))


def part_name(split: str, index: int, count: int) -> str:
    """The file name of part `index` (from 0) of the `count` parts of an exported split.

    Args:
        split: the split's name, e.g. 'train'.
        index: the part's position, 0..count-1.
        count: how many parts the split was written in.

    Returns:
        The name, zero-padded so names sort in part order.

    Example:
        >>> part_name("train", 1, 3)
        'train-00001-of-00003.npz'
    """
    return f"{split}-{index:05d}-of-{count:05d}.npz"


def find_parts(folder: str | Path, split: str) -> list[Path]:
    """The files in `folder` named as parts of `split` (see `part_name`), in order.

    Only names are looked at; `load_split` checks that they form one whole export.

    Args:
        folder: where to look; a missing folder holds no parts.
        split: the split's name.

    Returns:
        Their paths, sorted by name (so by part index); empty if there are none.

    Example:
        >>> [p.name for p in find_parts("/tmp/cifar_parts", "test")]  # doctest: +SKIP
        ['test-00000-of-00001.npz']
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = _part_pattern(split)
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))


def _part_pattern(split: str) -> re.Pattern:
    """Matches `part_name(split, ...)`; groups: index, count."""
    return re.compile(rf"{re.escape(split)}-(\d{{5}})-of-(\d{{5}})\.npz")


def _load_parts(paths: list[Path], split: str, limit: int | None) -> Split:
    """Reads exported parts in order, stopping as soon as `limit` examples are in."""
    _check_part_names(paths, split)
    pieces, total = [], None
    read = 0
    for path in paths:
        if read == limit:
            break
        piece, first, part_total = _load_part(path, None if limit is None else limit - read)
        total = part_total if total is None else total
        # Names alone cannot tell parts of two exports with equal counts apart.
        if (first, part_total) != (read, total):
            raise BadInputError(
                f"{path} does not continue {paths[0].name}: it holds examples from {first} "
                f"of {part_total}, expected from {read} of {total}; the {split} parts come "
                "from different exports, so export again into an empty folder"
            )
        pieces.append(piece)
        read += len(piece)
    columns = zip(*((p.images, p.labels, p.ids) for p in pieces))
    return Split(*(np.concatenate(c) for c in columns))


def _check_part_names(paths: list[Path], split: str) -> None:
    """Raises unless the names are parts 0..count-1 of `count`, one count for all."""
    pattern = _part_pattern(split)
    parsed = [tuple(int(g) for g in pattern.fullmatch(p.name).groups()) for p in paths]
    folder = paths[0].parent
    counts = sorted({count for _, count in parsed})
    if len(counts) > 1:
        raise BadInputError(
            f"{folder} mixes {split} parts of different exports (-of- counts {counts}); "
            "export again into an empty folder"
        )
    count = counts[0]
    indices = {index for index, _ in parsed}
    missing = sorted(set(range(count)) - indices)
    if missing:
        names = ", ".join(part_name(split, i, count) for i in missing)
        raise MissingError(
            f"{folder} lacks {len(missing)} of the {count} {split} parts: {names}"
        )
    if indices != set(range(count)):
        raise BadInputError(
            f"{folder}: {split} part indices {sorted(indices)} go past -of-{count:05d}"
        )


def _load_part(path: Path, limit: int | None) -> tuple[Split, int, int]:
    """Reads one part; returns its first `limit` examples, its `first` and its `total`."""
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in _PART_ARRAYS if k in data.files}
    # A part cut short in transfer or corrupted: name the file, not a zip internal.
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise BadInputError(f"{path} cannot be read as an npz file ({e}); copy it again") from e
    missing = set(_PART_ARRAYS) - set(arrays)
    if missing:
        raise BadInputError(f"{path} is not a part written by export_npz: it lacks {sorted(missing)}")
    images, labels, ids = (arrays[k][:limit] for k in ("images", "labels", "ids"))
    shapes_agree = len(labels) == len(ids) == len(images)
    if images.dtype != np.uint8 or images.shape[1:] != _IMAGE_SHAPE or not shapes_agree:
        raise BadInputError(
            f"{path}: expected uint8 images [N, 32, 32, 3], N labels and N ids, got {images.dtype} "
            f"{images.shape}, {labels.shape} and {ids.shape}"
        )
    piece = Split(images, labels.astype(np.int32), ids.astype(str))
    return piece, int(arrays["first"]), int(arrays["total"])


def _open_source(split: str, data_dir: str | Path | None) -> Sequence[dict]:
    """Opens the TFDS data source, downloading only where that can succeed.

    TFDS's CIFAR-10 preparation reads the downloaded archive with TensorFlow, but it
    only finds out after downloading 160 MB; without TensorFlow we stop first. Without
    a network, TFDS retries the download for minutes and ends in a traceback; a probe
    of a few seconds stops first.
    """
    if data_dir is not None and not Path(data_dir).is_dir():
        raise MissingError(f"data_dir {str(data_dir)!r} does not exist or is not a folder")
    where = "TFDS's default data dir" if data_dir is None else f"data_dir {str(data_dir)!r}"
    parts = f"no {split}-NNNNN-of-NNNNN.npz parts from export_npz"
    try:
        import tensorflow_datasets as tfds  # here: an exported copy is read without TFDS
    except ImportError:
        missing = "tensorflow_datasets, which reads and downloads TFDS copies, is not installed"
        raise MissingError(
            _not_found_message(where, missing if data_dir is None else f"{parts}, and {missing}")
        ) from None
    builder = tfds.builder(_DATASET, data_dir=data_dir, **_BUILDER_KWARGS)
    if not builder.is_prepared():
        no_copy = f"no prepared TFDS copy at {builder.data_dir}"
        if data_dir is not None:
            raise MissingError(_not_found_message(where, f"{parts}, {no_copy}"))
        if not _tensorflow_installed():
            raise MissingError(
                _not_found_message(
                    where, f"{no_copy}, and TFDS needs TensorFlow to prepare one: "
                    "`pip install tensorflow-cpu`"
                )
            )
        if not _can_download():
            raise MissingError(
                _not_found_message(
                    where, f"{no_copy}, and TFDS cannot download one: {_DOWNLOAD_URL} is "
                    f"out of reach (no answer within {_PROBE_TIMEOUT_S:g} s)"
                )
            )
    return tfds.data_source(
        _DATASET,
        split=split,
        data_dir=data_dir,
        download=data_dir is None,
        builder_kwargs=_BUILDER_KWARGS,
    )


def _tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _can_download() -> bool:
    """Whether CIFAR-10's download URL answers a HEAD request within `_PROBE_TIMEOUT_S`.

    urllib honours the same proxy variables as TFDS's downloader (requests). The
    request runs in a daemon thread because urlopen's timeout does not cover name
    resolution, which can hang far longer on a machine with a resolver but no route.
    """
    answered = []

    def head() -> None:
        try:
            request = urllib.request.Request(_DOWNLOAD_URL, method="HEAD")
            urllib.request.urlopen(request, timeout=_PROBE_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # an error status still means the network works; TFDS may manage
        except OSError:
            return
        answered.append(True)

    thread = threading.Thread(target=head, daemon=True)
    thread.start()
    thread.join(_PROBE_TIMEOUT_S)
    return bool(answered)


def _not_found_message(where: str, reason: str) -> str:
    return (
        f"CIFAR-10 was not found in {where} ({reason}). Pass --data-dir pointing at a "
        "prepared TFDS copy (made once with `tfds build cifar10 --file_format=array_record "
        "--data_dir=DIR`) or at a folder written by `python -m experiments.cifar10.export_npz`."
    )


def _check_features(features) -> None:
    """Raises BadInputError unless `features` has CIFAR-10's `image` and `label`."""
    missing = {"image", "label"} - set(features.keys())
    if missing:
        raise BadInputError(
            f"expected features 'image' and 'label', found {sorted(features.keys())} "
            f"(missing {sorted(missing)})"
        )
    image = features["image"]
    found = (tuple(image.shape), np.dtype(image.np_dtype))
    if found != (_IMAGE_SHAPE, np.dtype(np.uint8)):
        raise BadInputError(
            f"expected uint8 images of shape {_IMAGE_SHAPE}, found {found[1]} {found[0]}"
        )


def _as_str(value) -> str:
    # The real data stores ids as bytes; tfds.testing.mock_data yields str.
    return value.decode() if isinstance(value, bytes) else str(value)


def exact_test_mask(ids: np.ndarray) -> np.ndarray:
    """Marks the 1,000 bit-exact test images, ids `test_00000`..`test_00999`.

    Args:
        ids: str [N], as in `Split.ids`.

    Returns:
        bool [N].
    """
    if ids is None:
        raise BadInputError("exact_test_mask needs ids; this dataset has no 'id' feature")
    return np.array(
        [i.startswith("test_") and int(i[len("test_") :]) < _NUM_EXACT_TEST for i in ids],
        dtype=bool,
    )


# The official MDEQ CIFAR-10 loader's transforms.Normalize (locuslab/deq, MDEQ-Vision/tools/cls_train.py),
# checked against that file by tests/test_mdeq_training.py. Its std is not the pixels' (0.247, 0.243, 0.261).
MDEQ_MEAN = (0.4914, 0.4822, 0.4465)
MDEQ_STD = (0.2023, 0.1994, 0.2010)
SCALINGS = ("unit", "mean-std")


def normalize(images, scaling: str = "unit"):
    """Maps uint8 pixels to float32 model inputs.

    Args:
        images: uint8 array ``[..., 3]`` (numpy or JAX, also inside `jit`).
        scaling: ``"unit"``: ``pixels / 255`` in [0, 1], as torchvision's ToTensor (the
            chapter's); ``"mean-std"``: then per channel ``(x - MDEQ_MEAN) / MDEQ_STD``, as
            the official MDEQ loader (ToTensor, then Normalize).

    Returns:
        float32 array of the same shape and kind. (XLA computes the divisions as products with
        reciprocals and may fuse them into multiply-adds: its values can differ from numpy's in
        the last bit.)
    """
    if scaling not in SCALINGS:
        raise ValueError(f"normalize: scaling must be one of {SCALINGS}, got {scaling!r}")
    unit = images.astype("float32") / 255.0
    if scaling == "unit":
        return unit
    return (unit - np.asarray(MDEQ_MEAN, np.float32)) / np.asarray(MDEQ_STD, np.float32)


def steps_per_epoch(num_examples: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """Number of batches `epoch_batches` yields.

    Args:
        num_examples: examples in the split.
        batch_size: examples per batch.
        drop_remainder: as in `epoch_batches`.

    Returns:
        floor(num_examples / batch_size), or the ceiling when the remainder is kept.
    """
    _check_batch_size(batch_size)
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def epoch_batches(
    split: Split, batch_size: int, *, rng: np.random.Generator | None, drop_remainder: bool,
    rows: slice = slice(None),
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields one epoch of batches, or of the same rows of each batch.

    Args:
        split: the data.
        batch_size: examples per batch.
        rng: shuffles the examples when given (training); None keeps their order (eval).
        drop_remainder: drop the last short batch (training, so every step has one
            shape) or yield it short (eval; see `pad_batch`).
        rows: read only these rows of each batch (one process's share of a global batch);
            in a short last batch, those of them that exist.

    Returns:
        An iterator of (images uint8 [B, 32, 32, 3], labels int32 [B]).
    """
    _check_batch_size(batch_size)
    n = len(split)
    order = np.arange(n) if rng is None else rng.permutation(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size][rows]
        yield split.images[idx], split.labels[idx]


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def pad_batch(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pads a short batch with zeros to `batch_size`, so a jitted step sees one shape.

    Args:
        images: [B, ...] with B <= batch_size.
        labels: [B].
        batch_size: the full batch size.

    Returns:
        (images [batch_size, ...], labels [batch_size], mask bool [batch_size]), where
        mask is True for the B real examples.
    """
    n = len(labels)
    if n > batch_size:
        raise ValueError(f"batch of {n} examples does not fit batch_size {batch_size}")
    pad = batch_size - n
    images = np.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
    return images, np.pad(labels, (0, pad)), np.arange(batch_size) < n


def augment(
    images: np.ndarray, rng: np.random.Generator, *, rows: slice = slice(None), batch_size: int | None = None
) -> np.ndarray:
    """Random 32x32 crop of the zero-padded (4 px) image, then a random horizontal flip.

    The same as torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip, done for
    the whole batch with one gather.

    Args:
        images: uint8 [B, H, W, C]: a whole batch, or its rows `rows`.
        rng: the source of randomness; the same generator state gives the same output.
        rows, batch_size: `images` are these rows of a batch of `batch_size` (default:
            the whole batch). The draws are made for the whole batch, so each process
            augments its rows as one process augmenting the whole batch would.

    Returns:
        uint8 [B, H, W, C].
    """
    _, h, w, _ = images.shape
    b = len(images) if batch_size is None else batch_size
    p = _CROP_PADDING
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    dy, dx, flip = (rng.integers(0, 2 * p + 1, size=b), rng.integers(0, 2 * p + 1, size=b), rng.random(b) < 0.5)
    dy, dx, flip = dy[rows], dx[rows], flip[rows]
    if len(dy) != len(images):
        raise ValueError(f"augment: {len(images)} images are not the rows {rows} of a batch of {batch_size}")
    src_rows = dy[:, None] + np.arange(h)  # [B, H]: source row of each output row
    src_cols = dx[:, None] + np.arange(w)  # [B, W]
    src_cols = np.where(flip[:, None], src_cols[:, ::-1], src_cols)  # mirroring the crop = reading it backwards
    return padded[np.arange(len(images))[:, None, None], src_rows[:, :, None], src_cols[:, None, :]]
