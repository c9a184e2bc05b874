"""Split each document of a loose-JSON corpus into sentences with nltk's Punkt.

    python tools/openwebtext/split_sentences.py --input owt_train.json --output owt_sent.json \\
        [--punkt-model-dir NLTK_DATA] [--lang english] [--format lines|list]

``--format lines`` (default) rewrites ``text`` with one sentence a line (whitespace inside a
sentence, newlines included, becomes one space); ``--format list`` keeps ``text`` and adds a
``sentences`` list. Other fields are kept. The model is nltk's pretrained ``punkt_tab`` for
``--lang``, looked up in ``--punkt-model-dir`` (an nltk data directory, the one holding
``tokenizers/punkt_tab/<lang>/``) and nltk's usual paths. When none is installed (nltk's data
cannot be downloaded everywhere), a Punkt model is trained on the first ``--train-bytes`` of the
input itself, and a one-line notice on stderr says so.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from owt_common import (  # noqa: E402
    UserError,
    atomic_outputs,
    cli,
    dump_record,
    format_counts,
    read_records,
    require_file,
)

FORMATS = ("lines", "list")
_WHITESPACE = re.compile(r"\s+")


def pretrained_punkt(lang: str, model_dir: str | None):
    """nltk's pretrained ``punkt_tab`` tokenizer for ``lang``, or None when not installed.

    ``model_dir`` (an nltk data directory) is searched first; it must exist and hold the model.
    """
    import nltk
    from nltk.tokenize.punkt import PunktTokenizer

    if model_dir is not None:
        if not os.path.isdir(model_dir):
            raise UserError(f"--punkt-model-dir {model_dir} does not exist; pass an nltk data "
                            f"directory holding tokenizers/punkt_tab/{lang}/")
        nltk.data.path.insert(0, model_dir)
    try:
        nltk.data.find(f"tokenizers/punkt_tab/{lang}/")
    except LookupError:
        if model_dir is not None:
            raise UserError(f"--punkt-model-dir {model_dir} has no tokenizers/punkt_tab/{lang}/; "
                            "point it at an nltk data directory with punkt_tab installed") from None
        return None
    return PunktTokenizer(lang)


def trained_punkt(texts: Iterator[str], train_bytes: int):
    """A Punkt tokenizer trained (unsupervised) on ``texts`` up to about ``train_bytes``."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer

    trainer = PunktTrainer()
    seen = 0
    for text in texts:
        trainer.train(text, finalize=False)
        seen += len(text)
        if seen >= train_bytes:
            break
    trainer.finalize_training()
    return PunktSentenceTokenizer(trainer.get_params())


def sentences(tokenizer, text: str) -> list[str]:
    """Sentences of ``text``, each with its inner whitespace collapsed to single spaces."""
    found = (_WHITESPACE.sub(" ", sentence).strip() for sentence in tokenizer.tokenize(text))
    return [sentence for sentence in found if sentence]


def load_tokenizer(input_path: str, lang: str, model_dir: str | None, train_bytes: int,
                   text_key: str, skip_bad_lines: bool):
    """The pretrained model if installed, else one trained on ``input_path`` (with a notice)."""
    tokenizer = pretrained_punkt(lang, model_dir)
    if tokenizer is not None:
        return tokenizer
    texts = (record[text_key] for _, record in read_records(input_path, skip_bad_lines, {}, text_key))
    print(f"notice: nltk punkt_tab/{lang} is not installed; training a Punkt model on the first "
          f"{train_bytes} characters of {input_path} (use --punkt-model-dir for the pretrained one)",
          file=sys.stderr)
    return trained_punkt(texts, train_bytes)


def split_file(input_path: str, output_path: str, lang: str = "english",
               model_dir: str | None = None, output_format: str = "lines",
               train_bytes: int = 20_000_000, text_key: str = "text",
               skip_bad_lines: bool = False) -> dict[str, int]:
    """Write every document with its sentences split; returns document and sentence counts."""
    if output_format not in FORMATS:
        raise UserError(f"--format {output_format} must be one of {', '.join(FORMATS)}")
    require_file(input_path, "--input")
    tokenizer = load_tokenizer(input_path, lang, model_dir, train_bytes, text_key, skip_bad_lines)
    counts = {"documents": 0, "sentences": 0, "bad_line": 0}
    with atomic_outputs(output_path) as (output,):
        for _, record in read_records(input_path, skip_bad_lines, counts, text_key):
            found = sentences(tokenizer, record[text_key])
            counts["documents"] += 1
            counts["sentences"] += len(found)
            if output_format == "lines":
                record = {**record, text_key: "\n".join(found)}
            else:
                record = {**record, "sentences": found}
            output.write(dump_record(record))
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="loose JSON, one document a line")
    parser.add_argument("--output", required=True)
    parser.add_argument("--punkt-model-dir", default=None,
                        help="nltk data directory holding tokenizers/punkt_tab/<lang>/")
    parser.add_argument("--lang", default="english", help="punkt_tab model name")
    parser.add_argument("--format", default="lines", choices=FORMATS,
                        help="lines: text with one sentence a line; list: add a sentences list")
    parser.add_argument("--train-bytes", type=int, default=20_000_000,
                        help="characters of input to train on when no pretrained model exists")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--skip-bad-lines", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = split_file(args.input, args.output, args.lang, args.punkt_model_dir, args.format,
                        args.train_bytes, args.text_key, args.skip_bad_lines)
    print(format_counts(counts))
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
