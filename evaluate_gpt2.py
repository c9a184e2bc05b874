"""Zero-shot evaluation of a trained GPT-2: WikiText-style perplexity or LAMBADA cloze accuracy.

    torchrun --nproc_per_node 2 evaluate_gpt2.py --load CKPT --model-parallel-size 2 \
        --vocab-file V --merge-file M --valid-data wiki.test.tokens --overlapping-eval 32
    ... --valid-data lambada_test.jsonl --cloze-eval

Perplexity (Megatron's method): the detokenized file is one token stream (a loose-JSON corpus,
``*.json``/``*.jsonl`` as training reads it: its documents, each ended by ``<|endoftext|>``), scored in windows of
``--seq-length`` targets starting every ``--overlapping-eval`` tokens; the first window scores all
its targets, later ones only their last ``--overlapping-eval`` (each target once, with the most
context the window allows). ``adjusted ppl`` rescales the loss by the token ratio
(tokens - 1) / (whitespace words - 1) so models with different tokenizers compare.
LAMBADA: a JSON line's last word is the target; an example is correct iff the greedy prediction
of every token of that word is right; ``target ppl`` is exp of the mean over examples of the target
word's summed negative log-likelihood (lm-evaluation-harness's ``acc`` and ``perplexity`` of its
LAMBADA task, on the same text when its lines are as LAMBADA's: single spaces, no leading or
trailing whitespace, two words or more). Any model-parallel size; rank 0 prints the result line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.data.loose_json import iter_json_texts
from megatron.errors import ConfigError
from megatron.inference import (
    InferenceModel,
    add_inference_args,
    inference_config,
    load_inference_model,
)
from megatron.inference.outputs import check_output_file
from megatron.tokenizer import AbstractTokenizer
from megatron.training.entry import run_entry_point


def build_parser() -> argparse.ArgumentParser:
    from arguments import build_parser as build_training_parser

    parser = add_inference_args(build_training_parser())
    parser.description = "GPT-2 zero-shot evaluation"
    group = parser.add_argument_group("zero-shot", "evaluation task")
    group.add_argument("--overlapping-eval", type=int, default=32, help="window stride for perplexity")
    group.add_argument("--cloze-eval", action="store_true", help="LAMBADA last-word accuracy")
    group.add_argument("--no-detokenize", action="store_true", help="skip the WikiText detokenizer")
    group.add_argument("--results-json", default=None, help="also write the results (full precision) here")
    return parser


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization (Megatron's ``wikitext_detokenizer``)."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for before, after in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                          (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        text = text.replace(before, after)
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for before, after in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" " + chr(176) + " ", chr(176)),
                          (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(before, after)
    return text


def perplexity_windows(num_tokens: int, seq_length: int, stride: int) -> list[tuple[int, int]]:
    """``(start, first scored target offset)`` of each window over a stream of ``num_tokens``.

    Window ``i`` holds tokens ``[start, start + seq_length]`` and predicts ``seq_length`` targets;
    together the windows score each of the ``num_tokens - 1`` targets exactly once.
    """
    targets = num_tokens - 1
    count = 1 + math.ceil(max(targets - seq_length, 0) / stride)
    return [(i * stride, 0 if i == 0 else seq_length - stride) for i in range(count)]


def _window_batch(tokens: list[int], windows: list[tuple[int, int]], seq_length: int,
                  pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows ``(n, seq_length + 1)`` (padded) and their loss masks ``(n, seq_length)``."""
    batch = torch.full((len(windows), seq_length + 1), pad, dtype=torch.long)
    mask = torch.zeros(len(windows), seq_length)
    for row, (start, first_scored) in enumerate(windows):
        chunk = tokens[start:start + seq_length + 1]
        batch[row, :len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        mask[row, first_scored:max(len(chunk) - 1, 0)] = 1.0
    return batch, mask


@torch.no_grad()
def total_loss(loaded: InferenceModel, tokens: list[int], args: argparse.Namespace) -> float:
    """Sum of the scored targets' losses (nats) over all windows."""
    seq_length = loaded.seq_length
    windows = perplexity_windows(len(tokens), seq_length, args.overlapping_eval)
    total = 0.0
    batch_size = args.eval_batch_size or args.batch_size
    for begin in range(0, len(windows), batch_size):
        batch, mask = _window_batch(tokens, windows[begin:begin + batch_size], seq_length, loaded.eod)
        batch, mask = batch.to(loaded.device), mask.to(loaded.device)
        logits = loaded.model(batch[:, :-1])
        losses = mpu.vocab_parallel_cross_entropy(logits.float().contiguous(), batch[:, 1:],
                                                  vocab_size=loaded.config.vocab_size)
        total += float((losses * mask).sum())
    return total


def read_text(path: str) -> str:
    """The UTF-8 text of ``--valid-data``; any other encoding is a user error."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise ConfigError(f"--valid-data {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                          "convert it to UTF-8") from None


def is_loose_json(path: str) -> bool:
    return path.endswith((".json", ".jsonl"))


def stream_of(path: str, tokenizer: AbstractTokenizer, detokenize: bool, text_key: str) -> tuple[list[int], int]:
    """(tokens, whitespace words) of ``--valid-data``: a text file is one stream; a loose-JSON
    corpus (training's format) is its documents, each followed by the end-of-document token."""
    if not is_loose_json(path):
        text = read_text(path)
        if detokenize:
            text = wikitext_detokenize(text)
        return tokenizer.tokenize(text), len(text.strip().split(" "))
    tokens: list[int] = []
    words = 0
    for text in iter_json_texts(path, text_key):
        tokens += tokenizer.tokenize(text) + [tokenizer.eod]
        words += len(text.strip().split(" "))
    return tokens, words


def evaluate_perplexity(loaded: InferenceModel, args: argparse.Namespace) -> dict:
    tokens, words = stream_of(args.valid_data[0], loaded.tokenizer, not args.no_detokenize, args.text_key)
    if len(tokens) < 2 or words < 2:
        raise ConfigError(f"--valid-data {args.valid_data[0]} holds too little text to evaluate")
    avg_loss = total_loss(loaded, tokens, args) / (len(tokens) - 1)
    token_ratio = (len(tokens) - 1) / (words - 1)
    return {"avg loss": avg_loss, "ppl": math.exp(min(20.0, avg_loss)),
            "adjusted ppl": math.exp(min(20.0, avg_loss * token_ratio)), "token ratio": token_ratio,
            "tokens": len(tokens), "words": words}


def read_cloze_examples(path: str, tokenizer: AbstractTokenizer) -> list[tuple[list[int], list[int]]]:
    """(context tokens, last-word tokens) per JSON line ``{"text": ...}``."""
    examples = []
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"].strip()
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{path}:{number} is not a JSON object with a \"text\" string") from None
        split = text.rfind(" ")
        if split <= 0:
            raise ConfigError(f"{path}:{number} has no context before its last word")
        examples.append((tokenizer.tokenize(text[:split]), tokenizer.tokenize(text[split:])))
    if not examples:
        raise ConfigError(f"--valid-data {path} holds no examples")
    return examples


@torch.no_grad()
def cloze_score(loaded: InferenceModel, context: list[int], target: list[int]) -> tuple[bool, float]:
    """(is every target token the greedy prediction, the target's negative log-likelihood in nats)."""
    tokens = (context + target)[-(loaded.seq_length + 1):]
    inputs = torch.tensor([tokens[:-1]], device=loaded.device)
    logits = mpu.gather_from_model_parallel_region(loaded.model(inputs))
    logits = logits[0, -len(target):, :loaded.config.vocab_size].float().cpu()
    expected = torch.tensor(target)
    nll = -float(torch.log_softmax(logits, dim=-1).gather(1, expected[:, None]).sum())
    return bool((logits.argmax(dim=-1) == expected).all()), nll


def evaluate_cloze(loaded: InferenceModel, args: argparse.Namespace) -> dict:
    """Accuracy, and the target perplexity exp(mean over examples of the last word's summed NLL):
    lm-evaluation-harness's ``acc`` and ``perplexity`` of its LAMBADA task, computed alike."""
    examples = read_cloze_examples(args.valid_data[0], loaded.tokenizer)
    scores = [cloze_score(loaded, context, target) for context, target in examples]
    correct = sum(right for right, _ in scores)
    mean_nll = sum(nll for _, nll in scores) / len(scores)
    return {"number correct": correct, "total examples": len(examples), "avg accuracy": correct / len(examples),
            "target ppl": math.exp(min(mean_nll, 700.0))}


def result_line(name: str, results: dict) -> str:
    if "avg accuracy" in results:
        return (f" validation results on {name} | number correct: {results['number correct']} | "
                f"total examples: {results['total examples']} | avg accuracy: {results['avg accuracy']:.4E} | "
                f"target ppl: {results['target ppl']:.4E} |")
    return (f" validation results on {name} | avg loss: {results['avg loss']:.4E} | ppl: {results['ppl']:.4E} | "
            f"adjusted ppl: {results['adjusted ppl']:.4E} | token ratio: {results['token ratio']} |")


def run(args: argparse.Namespace) -> None:
    if not args.valid_data:
        raise ConfigError("--valid-data is required: a WikiText-style text file, or with --cloze-eval a "
                          "LAMBADA JSON-lines file")
    if os.path.isdir(args.valid_data[0]):
        raise ConfigError(f"--valid-data {args.valid_data[0]!r} is a directory; pass the text (or, with "
                          "--cloze-eval, JSON-lines) file itself")
    if not os.path.isfile(args.valid_data[0]):
        raise ConfigError(f"--valid-data {args.valid_data[0]!r} does not exist")
    if args.overlapping_eval <= 0:
        raise ConfigError(f"--overlapping-eval must be positive, got {args.overlapping_eval}")
    if args.results_json:
        check_output_file("--results-json", args.results_json)  # before the model loads and the run
    loaded = load_inference_model(inference_config(args))
    if args.overlapping_eval > loaded.seq_length:
        raise ConfigError(f"--overlapping-eval ({args.overlapping_eval}) exceeds --seq-length ({loaded.seq_length})")
    evaluate = evaluate_cloze if args.cloze_eval else evaluate_perplexity
    results = evaluate(loaded, args)
    if dist.get_rank() == 0:
        name = "LAMBADA" if args.cloze_eval else os.path.basename(args.valid_data[0])
        print(result_line(name, results), flush=True)
        if args.results_json:
            with open(args.results_json, "w") as handle:
                json.dump(results, handle)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 done, 2 bad input (one ``error:`` line), 1 a collective failed."""
    return run_entry_point(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
