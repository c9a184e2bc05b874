"""Near-duplicate removal with MinHash LSH (datasketch): find duplicates, write the rest.

    python tools/openwebtext/dedup.py --input clean.json --output dedup.json \\
        --duplicates duplicates.json [--threshold 0.7] [--num-perm 128] [--ngram 5] [--id-key url]

Each document's text becomes a set of word n-gram shingles (lowercased, ``--ngram`` words; a
shorter document is one shingle), hashed into a MinHash of ``--num-perm`` permutations with a
fixed seed. Documents are visited in file order; one whose estimated Jaccard similarity with an
earlier *kept* document reaches ``--threshold`` is dropped, so the first occurrence is kept and
the result is deterministic. ``--duplicates`` gets one
``{"id": ..., "duplicate_of": ..., "jaccard_estimate": ...}`` line per dropped document, ids
taken from ``--id-key`` (default: the 1-based line number). Kept lines are copied unchanged.
Memory: one MinHash (``--num-perm`` x 8 bytes) plus LSH keys per kept document.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from owt_common import (  # noqa: E402
    UserError,
    atomic_outputs,
    check_probability,
    cli,
    dump_record,
    format_counts,
    read_records,
)

MINHASH_SEED = 1


@dataclass(frozen=True)
class Duplicate:
    """Document ``id`` dropped as a near-copy of the kept document ``duplicate_of``."""

    id: object
    duplicate_of: object
    jaccard_estimate: float


def shingles(text: str, ngram: int) -> set[bytes]:
    """Lowercased word ``ngram``-grams of ``text`` as UTF-8 bytes (the whole text if shorter)."""
    words = text.lower().split()
    if len(words) <= ngram:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + ngram]).encode("utf-8") for i in range(len(words) - ngram + 1)}


def minhash(text: str, num_perm: int, ngram: int):
    """Deterministic ``LeanMinHash`` of the shingles of ``text``."""
    from datasketch import LeanMinHash, MinHash

    sketch = MinHash(num_perm=num_perm, seed=MINHASH_SEED)
    sketch.update_batch(list(shingles(text, ngram)))
    return LeanMinHash(sketch)


def find_duplicates(documents: Iterable[tuple[object, str]], threshold: float = 0.7,
                    num_perm: int = 128, ngram: int = 5) -> Iterator[Duplicate | None]:
    """For each ``(id, text)`` in order: None to keep it, or the Duplicate that drops it.

    A document is a duplicate of the kept document with the highest Jaccard estimate at or above
    ``threshold`` among the LSH candidates (ties: the earliest).
    """
    from datasketch import MinHashLSH

    check_probability(threshold, "--threshold")
    if num_perm < 2 or ngram < 1:
        raise UserError(f"--num-perm ({num_perm}) must be at least 2 and --ngram ({ngram}) at least 1")
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept: list[tuple[object, object]] = []  # (id, minhash) by LSH key
    for doc_id, text in documents:
        sketch = minhash(text, num_perm, ngram)
        best: tuple[float, int] | None = None
        for key in sorted(lsh.query(sketch)):
            estimate = sketch.jaccard(kept[key][1])
            if estimate >= threshold and (best is None or estimate > best[0]):
                best = (estimate, key)
        if best is None:
            lsh.insert(len(kept), sketch)
            kept.append((doc_id, sketch))
            yield None
        else:
            yield Duplicate(doc_id, kept[best[1]][0], round(best[0], 4))


def _documents(path: str, id_key: str | None, text_key: str, skip_bad_lines: bool,
               counts: dict[str, int], records: list[dict]) -> Iterator[tuple[object, str]]:
    """``(id, text)`` of each record; each record is also left in ``records`` for the caller."""
    for number, record in read_records(path, skip_bad_lines, counts, text_key):
        if id_key is not None and id_key not in record:
            raise UserError(f"{path}:{number}: no {id_key!r} field for --id-key (found keys "
                            f"{sorted(record)}); pick another --id-key or leave it out")
        records[:] = [record]
        yield (number if id_key is None else record[id_key]), record[text_key]


def dedup_file(input_path: str, output_path: str, duplicates_path: str,
               threshold: float = 0.7, num_perm: int = 128, ngram: int = 5,
               id_key: str | None = None, text_key: str = "text",
               skip_bad_lines: bool = False) -> dict[str, int]:
    """Write the kept documents and the dropped ids; returns counts per reason."""
    check_probability(threshold, "--threshold")
    counts = {"kept": 0, "near_duplicate": 0, "bad_line": 0}
    current: list[dict] = []
    documents = _documents(input_path, id_key, text_key, skip_bad_lines, counts, current)
    with atomic_outputs(output_path, duplicates_path) as (output, duplicates):
        for verdict in find_duplicates(documents, threshold, num_perm, ngram):
            if verdict is None:
                counts["kept"] += 1
                output.write(dump_record(current[0]))
            else:
                counts["near_duplicate"] += 1
                duplicates.write(json.dumps(verdict.__dict__, ensure_ascii=False) + "\n")
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="loose JSON, one document a line")
    parser.add_argument("--output", required=True, help="loose JSON without near-duplicates")
    parser.add_argument("--duplicates", required=True,
                        help="JSON lines {id, duplicate_of, jaccard_estimate} of dropped documents")
    parser.add_argument("--threshold", type=float, default=0.7,
                        help="Jaccard similarity in (0, 1] at which a document is a duplicate")
    parser.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    parser.add_argument("--ngram", type=int, default=5, help="words per shingle")
    parser.add_argument("--id-key", default=None, help="field identifying a document "
                        "(default: its 1-based line number)")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--skip-bad-lines", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = dedup_file(args.input, args.output, args.duplicates, args.threshold, args.num_perm,
                        args.ngram, args.id_key, args.text_key, args.skip_bad_lines)
    print(f"{sum(counts.values())} documents: {format_counts(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
