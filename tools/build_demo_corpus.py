"""Build the demo corpus and its tokenizer (deterministic; about half a minute).

    python tools/build_demo_corpus.py [--output-dir data/demo] [--force]

Writes demo.json (English docstrings of the standard library and installed packages, loose
JSON), gpt2-vocab.json and gpt2-merges.txt (a byte-level BPE of ~8000 tokens trained on it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.demo import ensure_demo_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: builds unless present (or ``--force``) and prints the paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="data/demo")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    if args.force:
        marker = os.path.join(args.output_dir, ".complete")
        if os.path.exists(marker):
            os.remove(marker)
    start = time.perf_counter()
    paths = ensure_demo_corpus(args.output_dir)
    sizes = ", ".join(f"{path} ({os.path.getsize(path) / 1e6:.2f} MB)" for path in paths.values())
    print(f"demo corpus ready in {time.perf_counter() - start:.1f} s: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
