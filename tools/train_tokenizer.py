"""Train a GPT-2-style byte-level BPE on loose JSON and write vocab.json + merges.txt.

    python tools/train_tokenizer.py --input corpus.json --output-dir tok --vocab-size 8000

Writes ``{prefix}-vocab.json`` and ``{prefix}-merges.txt`` (GPT-2's format; load them with
``--vocab-file``/``--merge-file --tokenizer-type GPT2BPETokenizer``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.loose_json import iter_json_texts  # noqa: E402
from megatron.tokenizer.training import train_byte_level_bpe  # noqa: E402

__all__ = ["main", "train_byte_level_bpe"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="loose JSON file(s)")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--prefix", default="gpt2")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--skip-bad-lines", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; user mistakes exit 1 with a one-line message."""
    args = parse_args(argv)
    try:
        texts = (text for path in args.input
                 for text in iter_json_texts(path, args.text_key, args.skip_bad_lines))
        vocab, merges = train_byte_level_bpe(texts, args.vocab_size, args.output_dir,
                                             args.prefix, args.min_frequency)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {vocab} and {merges}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
