"""Exports CIFAR-10 from a TFDS data dir to ``train.npz`` / ``test.npz``, readable without TFDS.

For machines without ``tensorflow_datasets`` (e.g. a bare GPU machine that receives
files, not packages): the folder written here is a valid ``--data-dir`` for the
experiment. Each file holds ``images`` (uint8 [N, 32, 32, 3]), ``labels`` (int32 [N])
and ``ids`` (str [N], e.g. ``test_00042``), compressed.

Usage:
  python -m experiments.cifar10.export_npz --data-dir ../shared/data/tfds --out data_npz \\
      [--train-limit 20000] [--test-limit N | --exact-test-only]

``--exact-test-only`` keeps the 1,000 bit-exact test images (ids ``test_00000`` ..
``test_00999``, scattered through the split) out of the whole test split. 20,000
training images and those 1,000 take 56.6 MiB (53.9 + 2.7).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from experiments.cifar10 import input_pipeline as ip


def export(data_dir: str | Path | None, out: str | Path, limits: dict[str, int | None],
           exact_test_only: bool = False) -> dict[str, Path]:
    """Writes ``<out>/<split>.npz`` for each split in ``limits``.

    Args:
      data_dir: a TFDS data dir holding ``cifar10`` (array_record); None: TFDS's default.
      out: the folder to write (created if missing).
      limits: split name -> most examples to export (None: all).
      exact_test_only: keep only the bit-exact test images (among the first ``limits['test']``).

    Returns:
      split name -> path written.

    Example:
      >>> export("../shared/data/tfds", "/tmp/cifar_npz", {"test": 1000})  # doctest: +SKIP
      {'test': PosixPath('/tmp/cifar_npz/test.npz')}
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, limit in limits.items():
        data = ip.load_split(split, data_dir=data_dir, limit=limit)
        if data.ids is None:
            raise ValueError(f"the {split} split has no 'id' feature; the export needs ids")
        if split == "test" and exact_test_only:
            exact = ip.exact_test_mask(data.ids)
            data = ip.Split(data.images[exact], data.labels[exact], data.ids[exact])
        written[split] = out / f"{split}.npz"
        np.savez_compressed(written[split], images=data.images, labels=data.labels, ids=data.ids)
        print(f"{split}: {len(data)} examples -> {written[split]} ({written[split].stat().st_size / 2**20:.1f} MiB)")
    return written


def main(argv=None) -> dict[str, Path]:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="TFDS data dir holding cifar10")
    parser.add_argument("--out", required=True, help="folder to write train.npz and test.npz to")
    parser.add_argument("--train-limit", type=int, default=None, help="first N training examples (default all)")
    test = parser.add_mutually_exclusive_group()
    test.add_argument("--test-limit", type=int, default=None, help="first N test examples (default all)")
    test.add_argument("--exact-test-only", action="store_true", help="only the 1,000 bit-exact test images")
    args = parser.parse_args(argv)
    return export(args.data_dir, args.out, {"train": args.train_limit, "test": args.test_limit},
                  exact_test_only=args.exact_test_only)


if __name__ == "__main__":
    main()
