"""lm-evaluation-harness on an exported checkpoint of either training path, against evaluate_gpt2.py.

The path a user takes: ``tools/convert_checkpoint.py to-hf`` on a checkpoint (Megatron at
model-parallel size 2, DeepSpeed ZeRO 1 at model-parallel size 2), then ``lm_eval --model hf
--model_args pretrained=EXPORT_DIR`` on a local task (the YAML in ``docs/lm_eval/``, pointed at a
local JSON-lines file; nothing from the network). Its LAMBADA-style ``acc`` and ``perplexity`` must
equal ``evaluate_gpt2.py --cloze-eval``'s accuracy and target perplexity on the same text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_helpers import convert, tree_digest
from launchers import DIVISIBLE, ENV, REPO, TINY_GPT2, TOKENIZER, run_training

from .test_evaluate import _cloze_examples, _write_jsonl

TASK_YAML = REPO / "docs" / "lm_eval" / "lambada_local.yaml"


@pytest.fixture(scope="module")
def deepspeed_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DeepSpeed ZeRO 1 checkpoint at model-parallel size 2 (two training iterations)."""
    root = tmp_path_factory.mktemp("lm_eval_ds")
    config = root / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    run_training(2, [*TINY_GPT2, "--batch-size", "2", "--train-iters", "2", "--model-parallel-size", "2",
                     "--save", str(root / "ckpt"), "--deepspeed", "--deepspeed_config", str(config)])
    return root / "ckpt"


def _task_dir(tmp_path: Path, data: Path) -> Path:
    """The documented task YAML with its data file pointed at ``data``, as the docs tell users to."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    text = TASK_YAML.read_text()
    assert "/path/to/lambada.jsonl" in text
    (tasks / TASK_YAML.name).write_text(text.replace("/path/to/lambada.jsonl", str(data)))
    return tasks


def _lm_eval(export: Path, tasks: Path, output: Path) -> dict:
    """``lm_eval --model hf`` on CPU in fp32, offline; the task's metrics."""
    env = dict(ENV, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(output / "hf_home"),
               TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={export},dtype=float32", "--tasks", "lambada_local", "--include_path",
                           str(tasks), "--device", "cpu", "--batch_size", "1", "--output_path", str(output)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    found = sorted(output.rglob("results_*.json"))
    assert len(found) == 1, (found, done.stdout[-2000:])
    return json.loads(found[0].read_text())["results"]["lambada_local"]


@pytest.mark.parametrize("path", ["megatron", "deepspeed"])
def test_lm_eval_on_the_export_equals_evaluate_gpt2(path: str, model_pair: tuple[Path, Path],
                                                     deepspeed_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = model_pair[0] if path == "megatron" else deepspeed_checkpoint
    before = tree_digest(ckpt)
    export = tmp_path / "export"
    convert("to-hf", "--load", str(ckpt), "--output", str(export), *TOKENIZER)
    examples, correct = _cloze_examples(export)
    data = _write_jsonl(tmp_path / "lambada.jsonl", examples)
    ours_file = tmp_path / "ours.json"
    run_training(2, ["--load", str(ckpt), "--model-parallel-size", "2", *TOKENIZER, *DIVISIBLE, "--valid-data",
                     str(data), "--cloze-eval", "--results-json", str(ours_file)], script="evaluate_gpt2.py")
    ours = json.loads(ours_file.read_text())
    theirs = _lm_eval(export, _task_dir(tmp_path, data), tmp_path / "lm_eval_out")
    assert ours["number correct"] == correct
    assert theirs["acc,none"] == pytest.approx(ours["avg accuracy"], abs=1e-12), (theirs, ours)
    assert theirs["perplexity,none"] == pytest.approx(ours["target ppl"], rel=1e-4), (theirs, ours)
    assert os.listdir(export)  # the export is left for the user
    assert tree_digest(ckpt) == before, "exporting and evaluating changed the checkpoint they read"
