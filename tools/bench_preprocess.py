"""Preprocessing throughput: Rust-backed GPT2BPETokenizer (1 and 2 workers) vs pure-Python BPE.

    python tools/bench_preprocess.py [--input data/demo/demo.json] [--output bench_out/preprocess.json]

Runs tools/preprocess_data.py's pipeline (JSON parsing, tokenising, writing .bin/.idx) on the
same text with each tokenizer, prints a table and writes JSON. The pure-Python baseline is the
published GPT-2 algorithm (tools/reference_gpt2_bpe.py), which is what the original Megatron
tokenizer ran. A benchmark, not a test: it never fails on a timing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from preprocess_data import preprocess  # noqa: E402
from reference_gpt2_bpe import ReferenceGPT2BPE  # noqa: E402

from megatron.data.demo import ensure_demo_corpus  # noqa: E402
from megatron.tokenizer import EOD_TOKEN, AbstractTokenizer, GPT2BPETokenizer  # noqa: E402


class PurePythonGPT2(AbstractTokenizer):
    """The reference BPE behind the tokenizer interface, so the same pipeline can run it."""

    name = "pure-Python GPT-2 BPE"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        self.bpe = ReferenceGPT2BPE(vocab_file, merge_file)

    @property
    def vocab_size(self) -> int:
        return len(self.bpe.encoder)

    @property
    def eod(self) -> int:
        return self.bpe.encoder[EOD_TOKEN]

    def tokenize(self, text: str) -> list[int]:
        return self.bpe.encode(text)

    def detokenize(self, ids: list[int]) -> str:
        return self.bpe.decode(list(ids))


def run(name: str, factory, workers: int, path: str, scratch: str) -> dict:
    """One preprocessing run; returns its row of the table."""
    stats = preprocess(path, os.path.join(scratch, f"{name}_{workers}"), factory, ["text"],
                       append_eod=True, workers=workers, progress=False)
    return {"tokenizer": name, "workers": workers, "documents": stats.documents,
            "megabytes": stats.bytes / 1e6, "seconds": stats.seconds,
            "mb_per_s": stats.bytes / 1e6 / stats.seconds,
            "docs_per_s": stats.documents / stats.seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=None, help="loose JSON (default: the demo corpus)")
    parser.add_argument("--vocab-file", default=None)
    parser.add_argument("--merge-file", default=None)
    parser.add_argument("--output", default="bench_out/preprocess.json")
    args = parser.parse_args(argv)
    if args.input is None:
        demo = ensure_demo_corpus()
        args.input, args.vocab_file, args.merge_file = (str(demo[k]) for k in ("data", "vocab", "merges"))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, cls in (("hf-tokenizers", GPT2BPETokenizer), ("pure-python", PurePythonGPT2)):
            factory = functools.partial(cls, args.vocab_file, args.merge_file)
            for workers in (1, 2):
                rows.append(run(name, factory, workers, args.input, scratch))
    baseline = next(r for r in rows if r["tokenizer"] == "pure-python" and r["workers"] == 1)
    print(f"{'tokenizer':<15}{'workers':>8}{'MB/s':>9}{'docs/s':>10}{'seconds':>9}{'speedup':>9}")
    for row in rows:
        row["speedup_vs_pure_python_1w"] = row["mb_per_s"] / baseline["mb_per_s"]
        print(f"{row['tokenizer']:<15}{row['workers']:>8}{row['mb_per_s']:>9.2f}"
              f"{row['docs_per_s']:>10.0f}{row['seconds']:>9.2f}{row['speedup_vs_pure_python_1w']:>8.1f}x")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "input": args.input, "rows": rows}, handle, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
