"""Train a BERT WordPiece vocabulary (``vocab.txt``) on loose-JSON or plain-text corpora.

    python tools/train_wordpiece.py --input data/demo/demo.json --output vocab.txt --vocab-size 8000

``--input`` files ending in ``.json``/``.jsonl`` are read as loose JSON (``--text-key``), others
as plain text (one document per line). The result loads with ``--tokenizer-type
BertWordPieceLowerCase`` (or ``BertWordPieceCase`` when trained with ``--cased``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.loose_json import iter_json_texts  # noqa: E402
from megatron.tokenizer.wordpiece import train_wordpiece  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="corpus files (loose JSON or text)")
    parser.add_argument("--output", required=True, help="vocab.txt to write (atomically)")
    parser.add_argument("--vocab-size", type=int, default=30522, help="tokens, special tokens included")
    parser.add_argument("--min-frequency", type=int, default=2, help="least count of a kept piece")
    parser.add_argument("--cased", action="store_true", help="keep case and accents (BertWordPieceCase)")
    parser.add_argument("--text-key", default="text", help="JSON key holding the text")
    return parser.parse_args(argv)


def iter_texts(paths: list[str], text_key: str) -> Iterator[str]:
    """Documents of every input file, in order."""
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"--input {path} does not exist; pass loose-JSON or text files")
        if path.endswith((".json", ".jsonl")):
            yield from iter_json_texts(path, text_key)
        else:
            with open(path, encoding="utf-8") as handle:
                yield from (line for line in handle if line.strip())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = train_wordpiece(iter_texts(args.input, args.text_key), args.vocab_size, args.output,
                               lowercase=not args.cased, min_frequency=args.min_frequency)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
