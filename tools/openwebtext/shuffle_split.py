"""Shuffle a loose-JSON corpus deterministically and split it into train/valid/test files.

    python tools/openwebtext/shuffle_split.py --input dedup.json --output-prefix owt \\
        [--split 949,50,1] [--seed 1234]

Writes ``{prefix}_train.json``, ``{prefix}_valid.json`` and ``{prefix}_test.json`` (a split of
weight 0 gives an empty file). Lines are moved verbatim (not parsed); blank lines are dropped.
The order depends only on ``--seed`` and the number of lines: a permutation from numpy's PCG64.
Split ``k`` gets lines ``[round(n * c_{k-1}), round(n * c_k))`` of the shuffled order, ``c`` the
cumulative normalised weights. Only line offsets are held in memory, not the text.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from owt_common import UserError, atomic_outputs, cli, format_counts, require_file  # noqa: E402

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """Three non-negative weights from ``"949,50,1"`` (missing trailing ones are 0)."""
    try:
        weights = [float(part) for part in split.replace("/", ",").split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(not (w >= 0 and math.isfinite(w)) for w in weights) or sum(weights) <= 0:
        raise UserError(f"--split {split!r} must be up to three non-negative weights with a "
                        "positive sum, e.g. 949,50,1")
    return weights + [0.0] * (3 - len(weights))


def split_bounds(total: int, weights: list[float]) -> list[int]:
    """``[0, b1, b2, total]``: split ``k`` is ``[bounds[k], bounds[k + 1])``."""
    cumulative = np.cumsum(weights) / sum(weights)
    return [0] + [int(round(total * c)) for c in cumulative[:-1]] + [total]


def line_offsets(path: str) -> np.ndarray:
    """Byte offsets of the non-blank lines of ``path``."""
    offsets = []
    position = 0
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                offsets.append(position)
            position += len(line)
    return np.asarray(offsets, dtype=np.int64)


def shuffle_split_file(input_path: str, output_prefix: str, split: str = "949,50,1",
                       seed: int = 1234) -> dict[str, int]:
    """Write the three split files; returns the number of lines in each."""
    require_file(input_path, "--input")
    weights = parse_split(split)
    offsets = line_offsets(input_path)
    order = offsets[np.random.default_rng(seed).permutation(len(offsets))]
    bounds = split_bounds(len(order), weights)
    paths = [f"{output_prefix}_{name}.json" for name in SPLIT_NAMES]
    with open(input_path, "rb") as source, atomic_outputs(*paths) as outputs:
        for index, output in enumerate(outputs):
            for offset in order[bounds[index]:bounds[index + 1]]:
                source.seek(offset)
                line = source.readline().decode("utf-8", errors="replace")
                output.write(line if line.endswith("\n") else line + "\n")
    return {name: bounds[k + 1] - bounds[k] for k, name in enumerate(SPLIT_NAMES)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="loose JSON, one document a line")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX_train.json, PREFIX_valid.json, PREFIX_test.json")
    parser.add_argument("--split", default="949,50,1", help="train,valid,test weights")
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = shuffle_split_file(args.input, args.output_prefix, args.split, args.seed)
    print(f"{sum(counts.values())} documents: {format_counts(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
