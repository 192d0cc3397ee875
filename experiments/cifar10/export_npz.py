"""Exports CIFAR-10 from a TFDS data dir to .npz parts, readable without TFDS.

For machines without ``tensorflow_datasets`` (e.g. a bare GPU machine that receives
files, not packages): the folder written here is a valid ``--data-dir`` for the
experiment. Each split is written as ``<split>-NNNNN-of-NNNNN.npz`` (one part unless
``--max-part-mib`` is given), each part holding ``images`` (uint8 [N, 32, 32, 3]),
``labels`` (int32 [N]), ``ids`` (str [N], e.g. ``test_00042``), ``first`` and ``total``
(its rows are the split's [first, first + N) of total), compressed and bit-exact.

Usage:
  python -m experiments.cifar10.export_npz --data-dir ../shared/data/tfds --out data_npz \\
      [--max-part-mib 60] [--train-limit 20000] [--test-limit N | --exact-test-only]

``--max-part-mib`` keeps every part at most that size on disk, for transfers with a
size limit per file. All of CIFAR-10 with ``--max-part-mib 60`` (20,142 examples a part):
``train-00000-of-00003.npz`` .. ``train-00002-of-00003.npz`` take 54.33, 54.43 and
26.25 MiB, ``test-00000-of-00001.npz`` 27.20 MiB, 162.22 MiB in all (written in 53 s
on 2 shared cores; ``load_split`` reads both splits back from them in 1.5 s:
``sum(len(ip.load_split(s, data_dir=OUT)) for s in ("train", "test"))``, timed).
``--exact-test-only`` keeps the 1,000 bit-exact test images (ids ``test_00000`` ..
``test_00999``, scattered through the split) out of the whole test split; with
``--train-limit 20000`` that makes one part each, 53.95 + 2.70 MiB.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from experiments.cifar10 import input_pipeline as ip

# Rows are counted by their uncompressed size, so a part fits whatever deflate achieves:
# it shrinks CIFAR-10 by only ~9%, and grows incompressible data a little (random images:
# +0.04% with headers), and each of the five arrays brings a few hundred bytes of zip
# and .npy headers. This headroom covers both; write_parts checks each file on disk.
_HEADROOM_FRACTION = 1e-3
_HEADROOM_BYTES = 8 * 1024


def export(data_dir: str | Path | None, out: str | Path, limits: dict[str, int | None],
           exact_test_only: bool = False, max_part_mib: float | None = None) -> dict[str, list[Path]]:
    """Writes each split in ``limits`` as parts ``<out>/<split>-NNNNN-of-NNNNN.npz``.

    Earlier parts of those splits in ``out`` are removed first, so the folder holds one
    export of each.

    Args:
      data_dir: a TFDS data dir holding ``cifar10`` (array_record), or an earlier export
        (to cut it into other parts); None: TFDS's default.
      out: the folder to write (created if missing).
      limits: split name -> most examples to export (None: all).
      exact_test_only: keep only the bit-exact test images (among the first ``limits['test']``).
      max_part_mib: most MiB (2**20 bytes) per part on disk; None: one part per split.

    Returns:
      split name -> the parts written, in order.

    Example:
      >>> export("../shared/data/tfds", "/tmp/cifar_npz", {"test": 1000}, max_part_mib=1)  # doctest: +SKIP
      {'test': [PosixPath('/tmp/cifar_npz/test-00000-of-00003.npz'), ...]}
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    max_bytes = None if max_part_mib is None else int(max_part_mib * 2**20)
    written = {}
    for split, limit in limits.items():
        data = ip.load_split(split, data_dir=data_dir, limit=limit)
        if data.ids is None:
            raise ValueError(f"the {split} split has no 'id' feature; the export needs ids")
        if split == "test" and exact_test_only:
            exact = ip.exact_test_mask(data.ids)
            data = ip.Split(data.images[exact], data.labels[exact], data.ids[exact])
        written[split] = write_parts(data, out, split, max_bytes)
    return written


def write_parts(data: ip.Split, out: Path, split: str, max_bytes: int | None) -> list[Path]:
    """Writes ``data`` as consecutive parts of at most ``max_bytes`` each, and prints each.

    Args:
      data: the examples, with ids.
      out: an existing folder; its earlier parts of ``split`` are removed.
      split: the name the parts carry.
      max_bytes: most bytes per part file; None: one part.

    Returns:
      The parts' paths, in order.

    Raises:
      ValueError: ``max_bytes`` is too small for one example.
      RuntimeError: a part came out larger than ``max_bytes`` (the headroom was too small).

    Example:
      >>> test = ip.load_split("test", data_dir="../shared/data/tfds")  # doctest: +SKIP
      >>> write_parts(test, Path("/tmp/cifar_parts"), "test", 60 * 2**20)  # doctest: +SKIP
      test: test-00000-of-00001.npz  examples 0..9999 (10000), 27.20 MiB
      [PosixPath('/tmp/cifar_parts/test-00000-of-00001.npz')]
    """
    n = len(data)
    rows = max(n, 1) if max_bytes is None else rows_per_part(data, max_bytes)
    count = max(1, math.ceil(n / rows))
    for old in ip.find_parts(out, split):
        old.unlink()  # a stale part of another count would make the folder unreadable
    paths = []
    for index in range(count):
        start, stop = index * rows, min((index + 1) * rows, n)
        path = out / ip.part_name(split, index, count)
        np.savez_compressed(path, images=data.images[start:stop], labels=data.labels[start:stop],
                            ids=data.ids[start:stop], first=start, total=n)
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise RuntimeError(f"{path} has {size} bytes, over the limit of {max_bytes}")
        print(f"{split}: {path.name}  examples {start}..{stop - 1} ({stop - start}), {size / 2**20:.2f} MiB")
        paths.append(path)
    return paths


def rows_per_part(data: ip.Split, max_bytes: int) -> int:
    """How many examples of ``data`` fit a part of ``max_bytes``, whatever deflate achieves.

    Args:
      data: the examples (their dtypes and shapes set the size of a row).
      max_bytes: most bytes per part file.

    Returns:
      A positive number of rows.

    Raises:
      ValueError: not even one row fits.

    Example:
      >>> train = ip.load_split("train", data_dir="../shared/data/tfds", limit=1)  # doctest: +SKIP
      >>> rows_per_part(train, 60 * 2**20)  # doctest: +SKIP
      20142
    """
    row_bytes = sum(a.itemsize * math.prod(a.shape[1:]) for a in (data.images, data.labels, data.ids))
    rows = (max_bytes - int(max_bytes * _HEADROOM_FRACTION) - _HEADROOM_BYTES) // row_bytes
    if rows < 1:
        raise ValueError(f"a part of {max_bytes} bytes cannot hold one example ({row_bytes} bytes "
                         f"and {_HEADROOM_BYTES} of headroom); raise --max-part-mib")
    return rows


def main(argv=None) -> dict[str, list[Path]]:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="TFDS data dir holding cifar10 (or an earlier export)")
    parser.add_argument("--out", required=True, help="folder to write the <split>-NNNNN-of-NNNNN.npz parts to")
    parser.add_argument("--max-part-mib", type=float, default=None,
                        help="most MiB per part file on disk, e.g. 60 (default: one part per split)")
    parser.add_argument("--train-limit", type=int, default=None, help="first N training examples (default all)")
    test = parser.add_mutually_exclusive_group()
    test.add_argument("--test-limit", type=int, default=None, help="first N test examples (default all)")
    test.add_argument("--exact-test-only", action="store_true", help="only the 1,000 bit-exact test images")
    args = parser.parse_args(argv)
    return export(args.data_dir, args.out, {"train": args.train_limit, "test": args.test_limit},
                  exact_test_only=args.exact_test_only, max_part_mib=args.max_part_mib)


if __name__ == "__main__":
    main()
