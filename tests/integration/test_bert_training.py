"""pretrain_bert.py end to end: model parallel 2 equals 1 on both paths, exact resume, the demo learns."""

from __future__ import annotations

from pathlib import Path

import pytest
from launchers import (
    DEMO_DIR,
    NO_DROPOUT,
    REPO,
    TOKENIZER,
    assert_losses_close,
    losses,
    run_tool,
    run_training,
)

SCRIPT = "pretrain_bert.py"
TINY_BERT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64", "--batch-size", "4",
    "--lr", "1e-3", "--lr-decay-iters", "20", "--warmup", "0.1", "--log-interval", "1",
    "--eval-iters", "0", "--eval-interval", "1000", "--num-workers", "0",
    "--train-data", "demo", "--demo-data-dir", str(DEMO_DIR),
    "--vocab-file", str(DEMO_DIR / "bert-uncased-vocab.txt"),
    # The demo WordPiece vocabulary (8000) pads to 8000 at model-parallel sizes 1 and 2 alike, so
    # initialisation (drawn for the padded table) is the same at both sizes.
    "--make-vocab-size-divisible-by", "40",
]
ITERS = ["--train-iters", "10"]
DEEPSPEED = ["--deepspeed", "--deepspeed_config", str(REPO / "scripts" / "ds_zero1_config.json")]


@pytest.fixture(scope="module")
def serial_losses(demo_corpus: Path) -> dict[int, str]:
    return losses(run_training(1, TINY_BERT + NO_DROPOUT + ITERS, script=SCRIPT).stdout)


@pytest.mark.parametrize("path", [[], DEEPSPEED], ids=["megatron", "deepspeed"])
def test_model_parallel_2_equals_serial(path: list[str], serial_losses: dict[int, str]) -> None:
    out = run_training(2, TINY_BERT + NO_DROPOUT + ITERS + ["--model-parallel-size", "2"] + path, script=SCRIPT)
    assert ("backend deepspeed" in out.stdout) == bool(path)
    assert_losses_close(losses(out.stdout), serial_losses, rel=1e-4)


def test_exact_resume_with_dropout(demo_corpus: Path, tmp_path: Path) -> None:
    """10 straight == 5, then --load and 5 more, dropout on, model parallel 2 (masks and RNG restored)."""
    common = TINY_BERT + ["--model-parallel-size", "2", "--sentence-head", "nsp"]
    straight = losses(run_training(2, common + ITERS, script=SCRIPT).stdout)
    save = str(tmp_path / "ckpt")
    first = run_training(2, common + ["--train-iters", "5", "--save", save], script=SCRIPT)
    second = run_training(2, common + ITERS + ["--load", save, "--save", save], script=SCRIPT)
    assert losses(first.stdout) == {i: straight[i] for i in range(1, 6)}
    assert losses(second.stdout) == {i: straight[i] for i in range(6, 11)}


def test_demo_run_learns(demo_corpus: Path, tmp_path: Path) -> None:
    out = run_training(1, TINY_BERT + ["--train-iters", "60", "--lr-decay-iters", "60", "--lr", "3e-3",
                                       "--batch-size", "8", "--log-interval", "10", "--sentence-head", "none",
                                       "--eval-iters", "2", "--eval-interval", "60", "--exp-dir",
                                       str(tmp_path / "exp")], script=SCRIPT)
    printed = losses(out.stdout)
    assert float(printed[60]) < float(printed[10]) - 1.0, printed
    assert "validation loss at iteration 60 | lm loss value: " in out.stdout


def test_bad_flags_are_one_line_errors(demo_corpus: Path) -> None:
    out = run_training(1, TINY_BERT + ITERS + ["--mask-prob", "1.5"], script=SCRIPT, check=False)
    assert out.returncode != 0 and "--mask-prob must be a probability in [0, 1], got 1.5" in out.stderr
    assert f'File "{REPO}' not in out.stderr


@pytest.fixture(scope="module")
def bert_run(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step BERT run: its checkpoint and experiment record."""
    root = tmp_path_factory.mktemp("bert_run")
    run_training(1, TINY_BERT + ["--train-iters", "1", "--save", str(root / "ckpt"), "--exp-dir", str(root / "exp"),
                                 "--mask-prob", "0.2", "--sentence-head", "nsp"], script=SCRIPT)
    return root


@pytest.mark.parametrize("tool", ["generate_samples.py", "evaluate_gpt2.py", "tools/convert_checkpoint.py"])
def test_gpt2_tools_refuse_a_bert_checkpoint_in_one_line(tool: str, bert_run: Path, tmp_path: Path) -> None:
    """A BERT checkpoint handed to a GPT-2 tool is a user mistake: one line, exit 2 (it was a
    KeyError traceback, before and after the restructure)."""
    (tmp_path / "text.txt").write_text("some words to score here")
    args = {"generate_samples.py": ["--load", str(bert_run / "ckpt"), *TOKENIZER, "--num-samples", "1"],
            "evaluate_gpt2.py": ["--load", str(bert_run / "ckpt"), *TOKENIZER, "--valid-data", str(tmp_path / "text.txt")],
            "tools/convert_checkpoint.py": ["to-hf", "--load", str(bert_run / "ckpt"), "--output", str(tmp_path / "hf")]}
    out = run_tool(tool, *args[tool], check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "error: the checkpoint holds no GPT-2 model" in out.stderr and "Traceback" not in out.stderr


def test_experiment_record_holds_the_bert_flags(bert_run: Path) -> None:
    import json

    text = json.dumps(json.loads((bert_run / "exp" / "hparams.json").read_text()))
    assert '"mask_prob": 0.2' in text and '"sentence_head": "nsp"' in text
