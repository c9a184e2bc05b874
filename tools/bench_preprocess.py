"""Preprocessing throughput: GPT2BPETokenizer on tiktoken vs Hugging Face tokenizers vs pure Python.

    python tools/bench_preprocess.py [--megabytes 20] [--mixed-megabytes 8] [--repeats 3]
        [--input X.json --vocab-file V --merge-file M] [--output bench_out/preprocess.json]

Rows per corpus:
  * tokenizer only (one process, the first 5 MB in ~64 KB batches, construction not timed), MB
    per CPU-second: GPT2BPETokenizer on tiktoken, the same on Hugging Face ``tokenizers`` (the
    previous backend, measured in the same run), and the pure-Python reference, all returning
    lists of ids; and tiktoken returning numpy arrays, as the pipeline's workers use it;
  * tools/preprocess_data.py's whole pipeline (JSON parsing, tokenising, writing .bin/.idx) with
    tiktoken on 1 and 2 worker processes, and the pure-Python reference on 1 (the baseline).
A pipeline row splits its wall time into a fixed start-up (building the tokenizer, forking the
pool, the first task, the tail and finalising: the time beyond what the steady rate needs) and a
steady-state rate (MB/s fitted to the per-task timeline between 10% and 90% of the input). The
pure-Python baseline is OpenAI's GPT-2 ``encoder.py`` algorithm with its unbounded word cache
(tools/reference_gpt2_bpe.py), what the original Megatron tokenizer ran.

Corpora (built in a scratch directory, deterministic), with the demo tokenizer:
  * ``demo-repeated``: the demo corpus (stdlib/package docstrings) repeated in shuffled document
    order to ``--megabytes``. Natural text whose vocabulary repeats: after the first pass almost
    every word hits the reference's cache, the reference's best case.
  * ``mixed``: demo documents alternating with documents of random words from several scripts
    (accented Latin, Greek, Cyrillic, CJK, digits, punctuation, emoji) to ``--mixed-megabytes``.
    Nearly every random word misses the cache, so the reference runs its Python merge loop:
    its worst case. Real web text lies between the two.
``--input`` times one given corpus instead. Each row is the best of ``--repeats`` interleaved
runs (every run is kept in the JSON); CPU-seconds (this process and its workers) are disturbed much
less than wall time by other jobs on a shared machine. The closing lines give the ratios issue 19
targets. A benchmark, not a test: it never fails on a timing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from preprocess_data import preprocess  # noqa: E402
from reference_gpt2_bpe import ReferenceGPT2BPE  # noqa: E402

from megatron.data.demo import ensure_demo_corpus  # noqa: E402
from megatron.data.indexed_dataset import best_token_dtype  # noqa: E402
from megatron.tokenizer import EOD_TOKEN, AbstractTokenizer, GPT2BPETokenizer  # noqa: E402

SCRIPTS = ("abcdefghijklmnopqrstuvwxyzàáâãäåæçèéêëìíîïñòóôõöøùúûüýÿœšž",
           "αβγδεζηθικλμνξοπρστυφχψω", "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
           "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年", "0123456789",
           "!?.,;:-()[]{}\"'/@#%&*+=", "😀😂🙂🚀🌍🎉💡🔥")
TOKENIZER_ONLY_BYTES = 5_000_000
TOKENIZERS = ("tiktoken", "hf-tokenizers", "pure-python")
# Tokenizer-only rows: every tokenizer through tokenize_batch (lists of ints), and tiktoken through
# tokenize_batch_numpy too, the arrays the pipeline writes: a worker is compared with that row.
TOKENIZER_ONLY = (("tiktoken", "lists"), ("tiktoken", "arrays"), ("hf-tokenizers", "lists"), ("pure-python", "lists"))
PIPELINES = (("tiktoken", 1), ("tiktoken", 2), ("pure-python", 1))
STEADY_SPAN = (0.1, 0.9)  # the steady rate is measured between these fractions of the input
TARGETS = {"tokenizer_only_vs_hf": 3.0, "pipeline_2w_vs_pure_python_1w": {"mixed": 10.0, "demo-repeated": 6.0},
           "per_worker_vs_tokenizer_only": 0.8}


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


def _write_until(path: str, documents: Callable[[], str], megabytes: float) -> None:
    """Loose JSON of ``documents()`` texts until the file holds ``megabytes``."""
    size = 0
    with open(path, "w", encoding="utf-8") as handle:
        while size < megabytes * 1e6:
            line = json.dumps({"text": documents()}, ensure_ascii=False) + "\n"
            handle.write(line)
            size += len(line.encode("utf-8"))


def demo_texts(demo_path: str) -> list[str]:
    with open(demo_path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def build_demo_repeated(demo: list[str], path: str, megabytes: float, seed: int = 0) -> None:
    """The demo documents, each pass in a fresh shuffled order, up to ``megabytes``."""
    rng = random.Random(seed)
    order: list[str] = []

    def next_document() -> str:
        if not order:
            order.extend(rng.sample(demo, len(demo)))
        return order.pop()

    _write_until(path, next_document, megabytes)


def random_words_document(rng: random.Random) -> str:
    """50-400 random 'words' (2-10 characters of one script each), spaces and some newlines."""
    words = []
    for _ in range(rng.randint(50, 400)):
        script = rng.choice(SCRIPTS)
        word = "".join(rng.choice(script) for _ in range(rng.randint(2, 10)))
        words.append(word.capitalize() if rng.random() < 0.1 else word)
    return " ".join(word + ("\n" if rng.random() < 0.05 else "") for word in words)


def build_mixed(demo: list[str], path: str, megabytes: float, seed: int = 0) -> None:
    """Demo documents alternating with random multi-script documents, up to ``megabytes``."""
    rng = random.Random(seed)
    turn = [0]

    def next_document() -> str:
        turn[0] += 1
        return demo[rng.randrange(len(demo))] if turn[0] % 2 else random_words_document(rng)

    _write_until(path, next_document, megabytes)


def factories(vocab: str, merges: str) -> dict[str, Callable[[], AbstractTokenizer]]:
    """Each tokenizer by its row name; the "tiktoken" one must really be on tiktoken."""
    backend = GPT2BPETokenizer(vocab, merges).backend
    if backend != "tiktoken":
        raise SystemExit(f"{merges}: GPT2BPETokenizer fell back to {backend}; nothing to measure")
    return {"tiktoken": functools.partial(GPT2BPETokenizer, vocab, merges),
            "hf-tokenizers": functools.partial(GPT2BPETokenizer, vocab, merges, backend="tokenizers"),
            "pure-python": functools.partial(PurePythonGPT2, vocab, merges)}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def steady_state(timeline: list[tuple[float, int]], seconds: float, total_bytes: int) -> tuple[float, float]:
    """(steady MB/s, fixed start-up seconds) of a pipeline run from its (seconds, bytes) per task:
    the least-squares rate over the tasks ending within STEADY_SPAN of the input (over all tasks
    when fewer than 3 do; workers' results arrive in bursts, which a fit smooths), and the wall
    time beyond ``total_bytes`` at that rate."""
    low, high = (fraction * total_bytes for fraction in STEADY_SPAN)
    points = [point for point in timeline if low <= point[1] <= high]
    points = points if len(points) >= 3 else timeline
    mean_time = sum(t for t, _ in points) / len(points)
    mean_bytes = sum(b for _, b in points) / len(points)
    spread = sum((t - mean_time) ** 2 for t, _ in points)
    if spread <= 0:  # one task: no steady part to see
        return total_bytes / 1e6 / seconds, 0.0
    rate = sum((t - mean_time) * (b - mean_bytes) for t, b in points) / spread / 1e6
    return rate, max(seconds - total_bytes / 1e6 / rate, 0.0)


def pipeline_row(corpus: str, name: str, factory: Callable[[], AbstractTokenizer], workers: int,
                 path: str, scratch: str) -> dict:
    """One tools/preprocess_data.py run; returns its row of the table."""
    cpu_start = cpu_seconds()
    stats = preprocess(path, os.path.join(scratch, f"{name}_{workers}"), factory, ["text"],
                       append_eod=True, workers=workers, progress=False)
    cpu = cpu_seconds() - cpu_start
    steady, startup = steady_state(stats.timeline, stats.seconds, stats.bytes)
    return {"corpus": corpus, "tokenizer": name, "mode": f"pipeline, {workers} worker(s)",
            "workers": workers, "documents": stats.documents, "megabytes": stats.bytes / 1e6,
            "seconds": stats.seconds, "mb_per_s": stats.bytes / 1e6 / stats.seconds,
            "cpu_seconds": cpu, "steady_mb_per_s": steady, "startup_seconds": startup}


def read_batches(path: str) -> tuple[list[list[str]], int, int]:
    """The first TOKENIZER_ONLY_BYTES of ``path``'s texts in batches of about 64 KB, with the
    number of texts and their UTF-8 bytes."""
    batches, batch, batch_size, count, size = [], [], 0, 0, 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["text"]
            batch.append(text)
            batch_size += len(text)
            count, size = count + 1, size + len(text.encode("utf-8"))
            if batch_size >= 1 << 16:
                batches.append(batch)
                batch, batch_size = [], 0
            if size >= TOKENIZER_ONLY_BYTES:
                break
    return [*batches, batch], count, size


def tokenizer_only_row(corpus: str, name: str, factory: Callable[[], AbstractTokenizer],
                       path: str, api: str = "lists") -> dict:
    """The tokenizer alone, in this process, on the first TOKENIZER_ONLY_BYTES of ``path``
    (``tokenize_batch``, or ``tokenize_batch_numpy`` for ``api`` "arrays"), construction timed apart."""
    batches, count, size = read_batches(path)
    built = time.perf_counter()
    tokenizer = factory()
    built = time.perf_counter() - built
    dtype = best_token_dtype(tokenizer.vocab_size)
    encode = tokenizer.tokenize_batch if api == "lists" else functools.partial(tokenizer.tokenize_batch_numpy, dtype=dtype)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    tokens = sum(len(ids) for batch in batches for ids in encode(batch))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    return {"corpus": corpus, "tokenizer": name, "mode": f"tokenizer only, {api}",
            "workers": 1, "documents": count, "megabytes": size / 1e6, "tokens": tokens,
            "seconds": seconds, "cpu_seconds": cpu, "mb_per_s": size / 1e6 / seconds,
            "construction_seconds": built}


def best_of(runs: list[dict]) -> dict:
    """The fastest run (steady rate for pipelines) with every run's figures kept: on a shared
    machine the best run is the one least disturbed by other jobs."""
    key = "steady_mb_per_s" if "steady_mb_per_s" in runs[0] else "mb_per_s"
    best = dict(max(runs, key=lambda row: row[key]))
    for field in ("mb_per_s", "steady_mb_per_s", "startup_seconds"):
        if field in best:
            best[f"{field}_all_runs"] = [round(row[field], 3) for row in runs]
    best["mb_per_cpu_s"] = best["megabytes"] / min(row["cpu_seconds"] for row in runs)
    return best


def bench_corpus(corpus: str, path: str, makers: dict[str, Callable[[], AbstractTokenizer]],
                 scratch: str, repeats: int) -> list[dict]:
    """Every row for one corpus (best of ``repeats`` interleaved runs), with steady-state
    speed-ups against the pure-Python 1-worker pipeline."""
    runs: dict[tuple[str, int | str], list[dict]] = {}
    for _ in range(repeats):
        for name, api in TOKENIZER_ONLY:
            runs.setdefault((name, api), []).append(tokenizer_only_row(corpus, name, makers[name], path, api))
        for name, workers in PIPELINES:
            runs.setdefault((name, workers), []).append(
                pipeline_row(corpus, name, makers[name], workers, path, scratch))
    rows = [best_of(runs[key]) for key in runs]
    baseline = pick(rows, "pure-python", "pipeline, 1 worker(s)")["steady_mb_per_s"]
    for row in rows:
        row["speedup_vs_pure_python_pipeline_1w"] = row.get("steady_mb_per_s", row["mb_per_s"]) / baseline
    return rows


def pick(rows: list[dict], tokenizer: str, mode: str) -> dict:
    """The row of ``tokenizer`` in ``mode``."""
    return next(row for row in rows if row["tokenizer"] == tokenizer and row["mode"] == mode)


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Issue 19's ratios per corpus: tiktoken vs HF tokenizers (tokenizer only, both returning
    lists, per CPU-second); 2-worker tiktoken pipeline vs 1-worker pure-Python pipeline (steady
    state); each tiktoken pipeline's per-worker steady rate over tiktoken's tokenizer-only rate
    per CPU-second with the arrays the pipeline uses."""
    result: dict[str, dict[str, float]] = {}
    for corpus in dict.fromkeys(row["corpus"] for row in rows):
        per_cpu = {(row["tokenizer"], row["mode"]): row["mb_per_cpu_s"] for row in rows if row["corpus"] == corpus}
        steady = {(row["tokenizer"], row["mode"]): row.get("steady_mb_per_s") for row in rows if row["corpus"] == corpus}
        arrays = per_cpu["tiktoken", "tokenizer only, arrays"]
        result[corpus] = {
            "tokenizer_only_vs_hf": per_cpu["tiktoken", "tokenizer only, lists"]
            / per_cpu["hf-tokenizers", "tokenizer only, lists"],
            "pipeline_2w_vs_pure_python_1w": steady["tiktoken", "pipeline, 2 worker(s)"]
            / steady["pure-python", "pipeline, 1 worker(s)"],
            **{f"per_worker_vs_tokenizer_only_{workers}w":
               steady["tiktoken", f"pipeline, {workers} worker(s)"] / workers / arrays for workers in (1, 2)}}
    return result


def print_table(rows: list[dict]) -> None:
    print(f"{'corpus':<15}{'tokenizer':<15}{'mode':<27}{'MB':>6}{'MB/s':>8}{'MB/cpu-s':>10}"
          f"{'steady MB/s':>13}{'start-up s':>12}{'speedup':>9}")
    for row in rows:
        steady = f"{row['steady_mb_per_s']:>13.2f}{row['startup_seconds']:>12.2f}" \
            if "steady_mb_per_s" in row else f"{'':>25}"
        print(f"{row['corpus']:<15}{row['tokenizer']:<15}{row['mode']:<27}{row['megabytes']:>6.1f}"
              f"{row['mb_per_s']:>8.2f}{row['mb_per_cpu_s']:>10.2f}{steady}"
              f"{row['speedup_vs_pure_python_pipeline_1w']:>8.1f}x")


def print_ratios(found: dict[str, dict[str, float]]) -> None:
    """The ratios next to issue 19's targets."""
    pipeline_targets = TARGETS["pipeline_2w_vs_pure_python_1w"]
    for corpus, values in found.items():
        target = pipeline_targets.get(corpus)
        print(f"{corpus}: tokenizer only, tiktoken vs HF tokenizers per CPU-second "
              f"{values['tokenizer_only_vs_hf']:.1f}x (target >= {TARGETS['tokenizer_only_vs_hf']:.0f}x); "
              f"2-worker pipeline steady state vs pure-Python 1 worker {values['pipeline_2w_vs_pure_python_1w']:.1f}x"
              + (f" (target >= {target:.0f}x)" if target else "")
              + f"; per worker vs tokenizer only {values['per_worker_vs_tokenizer_only_1w']:.0%} (1 worker), "
              f"{values['per_worker_vs_tokenizer_only_2w']:.0%} (2 workers; target >= "
              f"{TARGETS['per_worker_vs_tokenizer_only']:.0%})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=None, help="time this loose JSON instead")
    parser.add_argument("--vocab-file", default=None)
    parser.add_argument("--merge-file", default=None)
    parser.add_argument("--megabytes", type=float, default=20.0, help="size of demo-repeated")
    parser.add_argument("--mixed-megabytes", type=float, default=8.0, help="size of mixed")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the best is kept")
    parser.add_argument("--output", default="bench_out/preprocess.json")
    args = parser.parse_args(argv)
    if args.input is not None and not (args.vocab_file and args.merge_file):
        parser.error("--input needs --vocab-file and --merge-file")
    return args


def build_corpora(args: argparse.Namespace, demo: dict, scratch: str) -> dict[str, str]:
    """Corpus name -> loose-JSON path: ``--input``, else the two built corpora."""
    if args.input is not None:
        return {"input": args.input}
    texts = demo_texts(str(demo["data"]))
    corpora = {"demo-repeated": os.path.join(scratch, "demo_repeated.json"),
               "mixed": os.path.join(scratch, "mixed.json")}
    build_demo_repeated(texts, corpora["demo-repeated"], args.megabytes)
    build_mixed(texts, corpora["mixed"], args.mixed_megabytes)
    return corpora


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    demo = ensure_demo_corpus()
    vocab = args.vocab_file or str(demo["vocab"])
    merges = args.merge_file or str(demo["merges"])
    makers = factories(vocab, merges)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        corpora = build_corpora(args, demo, scratch)
        for corpus, path in corpora.items():
            rows.extend(bench_corpus(corpus, path, makers, scratch, args.repeats))
    found = ratios(rows)
    print_table(rows)
    print_ratios(found)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"date": time.strftime("%Y-%m-%d"),
                   "machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "load_average_before": load_before,
                   "load_average_after": os.getloadavg(), "vocab_file": vocab,
                   "corpora": {name: path if name == "input" else name for name, path in corpora.items()},
                   "rows": rows, "ratios": found, "targets": TARGETS}, handle, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
