"""generate_samples.py against transformers' generate, at model-parallel size 2, plus determinism."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from launchers import DIVISIBLE, TOKENIZER, assert_one_line_error, run_tool, run_training

from megatron.inference import filter_logits

PROMPTS = ["The language", "import os", "def main():", "x"]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_equals_transformers_generate(model_pair: tuple[Path, Path], tmp_path: Path) -> None:
    import transformers

    ckpt, hf_dir = model_pair
    prompts, output = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run_training(2, ["--load", str(ckpt), "--model-parallel-size", "2", *TOKENIZER, *DIVISIBLE, "--greedy",
                     "--out-seq-length", "24", "--sample-input-file", str(prompts),
                     "--sample-output-file", str(output)], script="generate_samples.py")
    results = _read_jsonl(output)
    assert [r["prompt"] for r in results] == PROMPTS
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(hf_dir)
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    eod = model.config.eos_token_id
    for result in results:
        context = tokenizer(result["prompt"], return_tensors="pt").input_ids
        expected = model.generate(context, max_length=24, do_sample=False, eos_token_id=eod, pad_token_id=eod)
        continuation = expected[0, context.size(1):].tolist()
        if eod in continuation:
            continuation = continuation[:continuation.index(eod)]
        assert result["text"] == tokenizer.decode(continuation), result
        assert len(continuation) > 5  # a random model: no early stop, the comparison is not vacuous


def test_sampling_is_deterministic_for_a_seed(model_pair: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = model_pair
    texts = []
    for seed in ("7", "7", "8"):
        output = tmp_path / f"out{len(texts)}.jsonl"
        run_tool("generate_samples.py", "--load", str(ckpt), *TOKENIZER, *DIVISIBLE, "--num-samples", "2",
                 "--top_k", "20", "--temperature", "0.9", "--out-seq-length", "16", "--seed", seed,
                 "--sample-output-file", str(output))
        texts.append([r["text"] for r in _read_jsonl(output)])
    assert texts[0] == texts[1] and texts[0] != texts[2]
    assert all(r == "" for r in [r["prompt"] for r in _read_jsonl(tmp_path / "out0.jsonl")])


BATCH_PROMPTS = ["The language", "x", "import os and sys", "def main():", "a", "class Foo(object):", "y = 1"]


def test_batched_greedy_equals_one_at_a_time_at_model_parallel_2(model_pair: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    """Prompts of different lengths, left-padded in batches of 4 (the last one of 3), at mp 2."""
    ckpt, _ = model_pair
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(BATCH_PROMPTS) + "\n")
    texts = {}
    for batch_size in ("1", "4"):
        output = tmp_path / f"out{batch_size}.jsonl"
        run_training(2, ["--load", str(ckpt), "--model-parallel-size", "2", *TOKENIZER, *DIVISIBLE, "--greedy",
                         "--out-seq-length", "20", "--batch-size", batch_size, "--sample-input-file", str(prompts),
                         "--sample-output-file", str(output)], script="generate_samples.py")
        results = _read_jsonl(output)
        assert [r["prompt"] for r in results] == BATCH_PROMPTS
        texts[batch_size] = [r["text"] for r in results]
    assert texts["4"] == texts["1"]
    assert len(set(texts["1"])) == len(BATCH_PROMPTS)  # different continuations: not vacuous


def test_sampled_text_depends_on_the_seed_not_the_batch_size(model_pair: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = model_pair
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(BATCH_PROMPTS[:5]) + "\n")
    texts = {}
    for batch_size, seed in (("1", "7"), ("4", "7"), ("4", "8")):
        output = tmp_path / f"out{batch_size}_{seed}.jsonl"
        run_tool("generate_samples.py", "--load", str(ckpt), *TOKENIZER, *DIVISIBLE, "--top_k", "20",
                 "--temperature", "0.9", "--out-seq-length", "16", "--seed", seed, "--batch-size", batch_size,
                 "--sample-input-file", str(prompts), "--sample-output-file", str(output))
        texts[batch_size, seed] = [r["text"] for r in _read_jsonl(output)]
    assert texts["4", "7"] == texts["1", "7"]
    assert all(a != b for a, b in zip(texts["4", "8"], texts["4", "7"]))


def test_top_k_and_top_p_filters() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [True, False, False, True]
    # softmax ~ [0.09, 0.66, 0.24, 0.03]: a nucleus of 0.7 needs the two largest.
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [True, False, False, True]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [True, False, True, True]


def test_bad_input_is_a_one_line_error(model_pair: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, hf_dir = model_pair
    common = [*TOKENIZER, "--greedy", "--num-samples", "1"]
    assert_one_line_error(run_tool("generate_samples.py", "--load", str(tmp_path / "none"), *common, check=False),
                          "does not exist")
    assert_one_line_error(run_tool("generate_samples.py", "--load", str(hf_dir), *common, check=False),
                          "no complete checkpoint")
    assert_one_line_error(run_tool("generate_samples.py", "--load", str(ckpt), *common, "--model-parallel-size",
                                   "3", check=False), "not divisible")
    # One line before the restructure too (NumPy's ValueError counted as a user error then).
    assert_one_line_error(run_tool("generate_samples.py", "--load", str(ckpt), *common, "--seed", "-1",
                                   check=False), "--seed must be in [0, 2**32 - 1]")
    assert_one_line_error(run_tool("generate_samples.py", "--load", str(ckpt), *common,
                                   "--make-vocab-size-divisible-by", "0", check=False),
                          "--make-vocab-size-divisible-by must be positive")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9\n".encode("latin-1"))  # a traceback (UnicodeDecodeError) before and after the restructure
    assert_one_line_error(run_tool("generate_samples.py", "--load", str(ckpt), *TOKENIZER, "--greedy",
                                   "--sample-input-file", str(latin1), check=False), "is not UTF-8 text")
    # Issue 16: a RuntimeError from multinomial, and a missing directory found only after the model loaded.
    assert_one_line_error(run_tool("generate_samples.py", "--load", str(ckpt), *common, "--temperature", "nan",
                                   check=False), "--temperature must be a finite positive number, got nan")
    assert_one_line_error(run_tool("generate_samples.py", "--load", str(ckpt), *common, "--sample-output-file",
                                   str(tmp_path / "missing" / "out.txt"), check=False),
                          f"the directory {tmp_path / 'missing'} does not exist")
    assert not (tmp_path / "missing").exists()
