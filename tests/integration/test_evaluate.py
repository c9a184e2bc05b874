"""evaluate_gpt2.py at model-parallel size 2 against transformers on the exported model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from launchers import DEMO_DIR, DIVISIBLE, TOKENIZER, assert_one_line_error, run_tool, run_training

from evaluate_gpt2 import perplexity_windows, wikitext_detokenize

SEQ, STRIDE = 32, 12


def _demo_text(documents: int) -> list[str]:
    lines = (DEMO_DIR / "demo.json").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:documents]]


def _hf(hf_dir: Path) -> tuple:
    import transformers

    return (transformers.GPT2TokenizerFast.from_pretrained(hf_dir),
            transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval())


def _hf_total_loss(model: object, tokens: list[int]) -> float:
    """Megatron's windows, written out: window i predicts tokens[s+1 .. s+SEQ], s = i * STRIDE; the
    first scores all its targets, later ones the last STRIDE."""
    total, start, scored_until = 0.0, 0, 0
    while scored_until < len(tokens) - 1:
        window = torch.tensor([tokens[start:start + SEQ + 1]])
        with torch.no_grad():
            logits = model(window[:, :-1]).logits[0]
        losses = torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="none")
        first = scored_until - start  # targets before this one were scored by an earlier window
        total += float(losses[first:].sum())
        scored_until, start = start + losses.numel(), start + STRIDE
    return total


def test_perplexity_equals_transformers(model_pair: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    ckpt, hf_dir = model_pair
    text_file, results_file = tmp_path / "wiki.txt", tmp_path / "results.json"
    text_file.write_text(" \n".join(_demo_text(3))[:3000])
    out = run_training(2, ["--load", str(ckpt), "--model-parallel-size", "2", *TOKENIZER, *DIVISIBLE,
                           "--valid-data", str(text_file), "--overlapping-eval", str(STRIDE),
                           "--results-json", str(results_file)], script="evaluate_gpt2.py")
    assert " validation results on wiki.txt | avg loss: " in out.stdout and "| adjusted ppl: " in out.stdout
    ours = json.loads(results_file.read_text())
    tokenizer, model = _hf(hf_dir)
    text = wikitext_detokenize(text_file.read_text())
    tokens = tokenizer(text).input_ids
    assert ours["tokens"] == len(tokens)
    loss = _hf_total_loss(model, tokens) / (len(tokens) - 1)
    assert math.isclose(ours["ppl"], math.exp(loss), rel_tol=1e-4), (ours, math.exp(loss))
    ratio = (len(tokens) - 1) / (len(text.strip().split(" ")) - 1)
    assert math.isclose(ours["avg loss"], loss, rel_tol=1e-5) and math.isclose(ours["token ratio"], ratio)
    assert math.isclose(ours["adjusted ppl"], math.exp(min(20.0, loss * ratio)), rel_tol=1e-4)


@pytest.mark.parametrize("num_tokens", [2, 20, 33, 34, 100, 101])
def test_windows_score_every_target_once(num_tokens: int) -> None:
    scored = []
    for start, first in perplexity_windows(num_tokens, SEQ, STRIDE):
        scored += [t for t in range(start + first, start + SEQ) if t < num_tokens - 1]
    assert scored == list(range(num_tokens - 1))


def _cloze_examples(hf_dir: Path) -> tuple[list[str], int]:
    """(LAMBADA-style texts, how many of them the model gets right), written out with transformers.
    Half the texts end in the model's own greedy next word, so the accuracy is informative."""
    tokenizer, model = _hf(hf_dir)
    examples = [" ".join(doc.split()[:10]) for doc in _demo_text(12)]
    correct = 0
    for index, text in enumerate(examples):
        context, word = text[:text.rfind(" ")], text[text.rfind(" "):]
        if index % 2 == 0:  # replace the last word by the model's own greedy continuation
            ids = tokenizer(context, return_tensors="pt").input_ids[:, -SEQ:]
            with torch.no_grad():
                next_id = int(model(ids).logits[0, -1].argmax())
            word = tokenizer.decode([next_id])
            if not word.startswith(" ") or " " in word[1:] or not word.strip():
                word = " the"
            examples[index] = context + word
        ids = (tokenizer(context).input_ids + tokenizer(word).input_ids)[-(SEQ + 1):]
        target = tokenizer(word).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]])).logits[0, -len(target):]
        correct += int(logits.argmax(-1).tolist() == target)
    assert 0 < correct < len(examples)
    return examples, correct


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def test_lambada_accuracy_equals_transformers(model_pair: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    ckpt, hf_dir = model_pair
    examples, correct = _cloze_examples(hf_dir)
    data = _write_jsonl(tmp_path / "lambada.jsonl", examples)
    out = run_tool("evaluate_gpt2.py", "--load", str(ckpt), *TOKENIZER, *DIVISIBLE, "--valid-data", str(data),
                   "--cloze-eval")
    assert (f" validation results on LAMBADA | number correct: {correct} | total examples: {len(examples)} | "
            f"avg accuracy: {correct / len(examples):.4E} | target ppl: ") in out.stdout


def test_bad_input_is_a_one_line_error(model_pair: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    ckpt, _ = model_pair
    missing = run_tool("evaluate_gpt2.py", "--load", str(ckpt), *TOKENIZER, "--valid-data", str(tmp_path / "x"),
                       check=False)
    assert_one_line_error(missing, "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert_one_line_error(run_tool("evaluate_gpt2.py", "--load", str(ckpt), *TOKENIZER, *DIVISIBLE,
                                   "--valid-data", str(bad), "--cloze-eval", check=False), "bad.jsonl:1")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))  # a UnicodeDecodeError traceback before
    for task in ([], ["--cloze-eval"]):
        assert_one_line_error(run_tool("evaluate_gpt2.py", "--load", str(ckpt), *TOKENIZER, *DIVISIBLE,
                                       "--valid-data", str(latin1), *task, check=False), "is not UTF-8 text")
    text = tmp_path / "wiki.txt"
    text.write_text("a few words of text\n")
    assert_one_line_error(run_tool("evaluate_gpt2.py", "--load", str(ckpt), *TOKENIZER, *DIVISIBLE, "--valid-data",
                                   str(text), "--results-json", str(tmp_path / "missing" / "r.json"), check=False),
                          f"--results-json {tmp_path / 'missing' / 'r.json'}: the directory")
