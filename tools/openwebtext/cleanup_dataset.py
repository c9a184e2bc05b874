"""Clean a loose-JSON corpus: repair text with ftfy, keep English, drop short documents.

    python tools/openwebtext/cleanup_dataset.py --input raw.json --output clean.json \\
        [--vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt] [--min-tokens 128] \\
        [--lang en --lang-threshold 0.5] [--text-key text] [--skip-bad-lines]

Each line is ``{"text": ..., other fields}``; kept lines are written with the repaired text and
the other fields unchanged. Documents are dropped, in this order, when shorter than
``--min-tokens`` tokens (GPT-2 BPE tokens when ``--vocab-file``/``--merge-file`` are given,
otherwise whitespace-separated words; the summary says which) or when py3langid (offline, ships its
model) gives ``--lang`` a probability below ``--lang-threshold``. Prints counts per reason.
A malformed line stops the run naming ``file:line`` unless ``--skip-bad-lines``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from owt_common import (  # noqa: E402
    UserError,
    atomic_outputs,
    check_probability,
    cli,
    dump_record,
    format_counts,
    read_records,
    require_file,
)


@dataclass(frozen=True)
class CleanupConfig:
    """What ``cleanup_file`` keeps: ``min_tokens`` counted by ``count_tokens``, language ``lang``
    with probability at least ``lang_threshold`` (in (0, 1])."""

    min_tokens: int = 128
    lang: str = "en"
    lang_threshold: float = 0.5
    text_key: str = "text"
    fix_text: bool = True


def whitespace_word_count(text: str) -> int:
    """Number of whitespace-separated words."""
    return len(text.split())


def gpt2_token_counter(vocab_file: str, merge_file: str) -> Callable[[str], int]:
    """A function counting GPT-2 BPE tokens with the tokenizer in these two files."""
    from megatron.tokenizer import GPT2BPETokenizer

    try:
        tokenizer = GPT2BPETokenizer(vocab_file, merge_file)
    except ValueError as error:  # TokenizerFileError: missing or mismatched files
        raise UserError(str(error)) from None
    return lambda text: len(tokenizer.tokenize(text))


def language_identifier() -> Callable[[str], tuple[str, float]]:
    """py3langid's ``classify`` with normalised probabilities: text -> (language, probability)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True).classify


def language_probability(classify: Callable[[str], tuple[str, float]], text: str,
                         lang: str) -> float:
    """Probability that ``text`` is in ``lang`` (0 when another language wins)."""
    found, probability = classify(text)
    return probability if found == lang else 0.0


def cleanup_file(input_path: str, output_path: str, config: CleanupConfig,
                 count_tokens: Callable[[str], int] = whitespace_word_count,
                 skip_bad_lines: bool = False) -> dict[str, int]:
    """Write the kept, repaired documents of ``input_path``; returns counts per reason."""
    import ftfy

    check_probability(config.lang_threshold, "--lang-threshold")
    if config.min_tokens < 0:
        raise UserError(f"--min-tokens must be at least 0, got {config.min_tokens}")
    classify = language_identifier()
    counts = {"kept": 0, "too_short": 0, "not_" + config.lang: 0, "bad_line": 0}
    with atomic_outputs(output_path) as (output,):
        for _, record in read_records(input_path, skip_bad_lines, counts, config.text_key):
            text = record[config.text_key]
            text = ftfy.fix_text(text) if config.fix_text else text
            if count_tokens(text) < config.min_tokens:
                counts["too_short"] += 1
            elif language_probability(classify, text, config.lang) < config.lang_threshold:
                counts["not_" + config.lang] += 1
            else:
                counts["kept"] += 1
                output.write(dump_record({**record, config.text_key: text}))
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="loose JSON, one document a line")
    parser.add_argument("--output", required=True, help="loose JSON of the kept documents")
    parser.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json (count BPE tokens)")
    parser.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (count BPE tokens)")
    parser.add_argument("--min-tokens", type=int, default=128)
    parser.add_argument("--lang", default="en", help="ISO 639-1 code to keep (py3langid)")
    parser.add_argument("--lang-threshold", type=float, default=0.5,
                        help="minimum probability of --lang, in (0, 1]")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--no-ftfy", action="store_true", help="do not repair text with ftfy")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count malformed lines instead of stopping")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = CleanupConfig(args.min_tokens, args.lang, args.lang_threshold, args.text_key,
                           not args.no_ftfy)
    check_probability(config.lang_threshold, "--lang-threshold")
    require_file(args.input, "--input")
    if (args.vocab_file is None) != (args.merge_file is None):
        raise UserError("pass both --vocab-file and --merge-file (GPT-2 BPE token counts) or "
                        "neither (whitespace word counts)")
    if args.vocab_file is not None:
        count_tokens = gpt2_token_counter(args.vocab_file, args.merge_file)
        unit = f"GPT-2 BPE tokens ({args.vocab_file})"
    else:
        count_tokens, unit = whitespace_word_count, "whitespace-separated words (no --vocab-file)"
    print(f"length counted in {unit}, --min-tokens {config.min_tokens}")
    counts = cleanup_file(args.input, args.output, config, count_tokens, args.skip_bad_lines)
    print(f"{sum(counts.values())} documents: {format_counts(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
