"""Every user mistake through the real entry point: one line naming the value and the fix,
exit status 2, no traceback, and no checkpoint already written is touched."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from checkpoint_helpers import tree_digest
from launchers import ENV, REPO, TINY_GPT2, run_script

from megatron.data.indexed_dataset import IndexedDatasetBuilder


def _run(args: list[str], nprocs: int = 1) -> subprocess.CompletedProcess:
    """``pretrain_gpt2.py args``: plain python for one process, torchrun for more."""
    return run_script("pretrain_gpt2.py", args, None if nprocs == 1 else nprocs, timeout=300, check=False)


@pytest.fixture(scope="module")
def workspace(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input")
    ckpt = root / "ckpt"
    done = _run(TINY_GPT2 + ["--batch-size", "2", "--train-iters", "2", "--save", str(ckpt)])
    assert done.returncode == 0, done.stderr[-2000:]
    corrupt = root / "corrupt"
    shutil.copytree(ckpt, corrupt)
    target = corrupt / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    (root / "bad.json").write_text("{not json")
    (root / "merges.txt").write_text("#version: 0.2\nq z\nqz y\n")
    (root / "not_a_dir").write_text("a file")
    good = IndexedDatasetBuilder(root / "good_text_document.bin")
    for start in range(0, 4000, 400):
        good.add_document(np.arange(start, start + 400) % 7000)
    good.finalize(root / "good_text_document.idx")
    truncated = root / "trunc_text_document"
    shutil.copy(root / "good_text_document.idx", f"{truncated}.idx")
    (root / "trunc_text_document.bin").write_bytes((root / "good_text_document.bin").read_bytes()[:1000])
    big = IndexedDatasetBuilder(root / "big_text_document.bin")
    big.add_document(np.full(2000, 9000))
    big.finalize(root / "big_text_document.idx")
    (root / "empty.json").write_text("")
    (root / "blank.json").write_text('{"text": ""}\n{"text": ""}\n')
    texts = [json.loads(line)["text"] for line in (demo_corpus / "demo.json").read_text().splitlines()[:40]]
    (root / "small.json").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return {"root": root, "ckpt": ckpt, "corrupt": corrupt}


def _ds(root: Path, config: dict) -> list[str]:
    path = root / f"ds_{abs(hash(json.dumps(config, sort_keys=True)))}.json"
    path.write_text(json.dumps(config))
    return ["--deepspeed", "--deepspeed_config", str(path)]


def _data_path(args: list[str], words: list[str]) -> list[str]:
    """``args`` reading ``--data-path words`` (a prefix, or weight/prefix pairs) instead of the demo."""
    out = list(args)
    index = out.index("--train-data")
    out[index: index + 2] = ["--data-path", *words]
    return out


def _json(w: dict[str, Path], name: str, *extra: str) -> list[str]:
    return ["--train-data", str(w["root"] / name), *extra]


CASES = {
    "heads vs model parallel": (lambda w: ["--model-parallel-size", "3"],
                                "--num-attention-heads (4) must be divisible by --model-parallel-size (3)", 1),
    "hidden vs heads": (lambda w: ["--hidden-size", "66"], "--hidden-size (66) must be divisible by --num-attention-heads (4)", 1),
    "world vs model parallel": (lambda w: ["--model-parallel-size", "4"],
                                "world size (2) is not divisible by --model-parallel-size (4)", 2),
    "batch vs deepspeed config": (lambda w: _ds(w["root"], {"train_batch_size": 3, "zero_optimization": {"stage": 1}}),
                                  "train_batch_size must equal --batch-size x gradient accumulation", 1),
    "missing deepspeed config": (lambda w: ["--deepspeed", "--deepspeed_config", str(w["root"] / "none.json")],
                                 "none.json' does not exist", 1),
    "malformed deepspeed config": (lambda w: ["--deepspeed", "--deepspeed_config", str(w["root"] / "bad.json")],
                                   "is not valid JSON", 1),
    "zero 2 with pipeline parallelism": (lambda w: ["--pipe-parallel-size", "2"]
                                         + _ds(w["root"], {"zero_optimization": {"stage": 2}}),
                                         "ZeRO stage 2", 1),
    "pipeline without deepspeed": (lambda w: ["--pipe-parallel-size", "2"], "needs --deepspeed", 1),
    # A DeepSpeed traceback from deepspeed.initialize before (hostile review of issue 17).
    "offload without deepspeed's optimizer": (
        lambda w: _ds(w["root"], {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}),
        'offloads the optimizer to cpu but defines no "optimizer"', 1),
    "sequence above positions": (lambda w: ["--seq-length", "64"],
                                 "--seq-length (64) exceeds --max-position-embeddings (32)", 1),
    "missing vocabulary": (lambda w: ["--vocab-file", str(w["root"] / "vocab.json")], "vocab.json does not exist", 1),
    "mismatched merges": (lambda w: ["--merge-file", str(w["root"] / "merges.txt")], "merges.txt", 1),
    "truncated dataset": (lambda w: ["DATA", str(w["root"] / "trunc_text_document")], "trunc_text_document", 1),
    "token ids out of range": (lambda w: ["DATA", str(w["root"] / "big_text_document")], "9000", 1),
    "missing load directory": (lambda w: ["--load", str(w["root"] / "nowhere")], "does not exist", 1),
    "corrupt checkpoint": (lambda w: ["--load", str(w["corrupt"]), "--save", str(w["corrupt"])],
                           "is corrupt", 1),
    "checkpoint of another shape": (lambda w: ["--load", str(w["ckpt"]), "--save", str(w["ckpt"]),
                                               "--hidden-size", "32"], "hidden_size: checkpoint 64 vs run 32", 1),
    "checkpoint of another model-parallel size": (lambda w: ["--load", str(w["ckpt"]), "--model-parallel-size", "2"],
                                                  "stages a converted copy under --save: pass --save", 2),
    "unwritable save": (lambda w: ["--save", str(w["root"] / "not_a_dir" / "ckpt")], "is not writable", 1),
    "zero iterations": (lambda w: ["--train-iters", "0"], "--train-iters must be positive, got 0", 1),
    "zero save minutes": (lambda w: ["--save-interval-minutes", "0"], "--save-interval-minutes must be positive", 1),
    "negative batch": (lambda w: ["--batch-size", "-2"], "--batch-size must be positive, got -2", 1),
    "zero learning rate": (lambda w: ["--lr", "0"], "--lr must be positive, got 0.0", 1),
    # One line before the restructure (a bare ValueError from NumPy or AdamW counted as a user error
    # then); tracebacks after it, until checked at start-up.
    "negative seed": (lambda w: ["--seed", "-1"], "--seed must be in [0, 2**32 - 1]", 1),
    "negative weight decay": (lambda w: ["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1", 1),
    "adam beta of 1.5": (lambda w: ["--adam-beta1", "1.5"], "--adam-beta1 must be in [0, 1), got 1.5", 1),
    "fp16 min scale 0": (lambda w: ["--fp16", "--min-scale", "0"], "--min-scale (0.0) must be positive", 1),
    "pipeline eval batch": (lambda w: ["--pipe-parallel-size", "2", "--eval-batch-size", "3"]
                            + _ds(w["root"], {"zero_optimization": {"stage": 1}}),
                            "--eval-batch-size (3) must equal --batch-size (2)", 1),
    "mistyped deepspeed batch": (lambda w: _ds(w["root"], {"train_batch_size": "8"}),
                                 "train_batch_size must be a positive integer (or \"auto\": from the flags), got '8'", 1),
    # Survival (issue 16): a run's directories, checkpoints and configuration.
    "load points at one checkpoint": (lambda w: ["--load", str(w["ckpt"] / "iter_0000002")],
                                      "is one checkpoint, not a run directory: pass --load", 1),
    "load holds no checkpoint": (lambda w: ["--load", str(w["root"])], "holds no complete checkpoint", 1),
    "save holds another run": (lambda w: ["--save", str(w["ckpt"])],
                               "already holds checkpoints of a run (iterations 2 to 2)", 1),
    "misspelt deepspeed key": (lambda w: _ds(w["root"], {"gradient_clippin": 1.0}),
                               "unknown key 'gradient_clippin' (did you mean 'gradient_clipping'?)", 1),
    "unknown nested deepspeed key": (lambda w: _ds(w["root"], {"zero_optimization": {"stage": 1, "bogus": 1}}),
                                     "Extra inputs are not permitted", 1),
    "zero stage 4": (lambda w: _ds(w["root"], {"zero_optimization": {"stage": 4}}),
                     "zero_optimization.stage must be 0, 1, 2 or 3, got 4", 1),
    # Issue 16: data that yields nothing to train on, and weights that are not numbers.
    "empty corpus": (lambda w: _json(w, "empty.json"), "empty.json holds no documents", 1),
    "only empty texts": (lambda w: _json(w, "blank.json"), "blank.json holds no documents", 1),
    "train split without documents": (lambda w: _json(w, "small.json", "--split", "0,1,0"),
                                      "--split 0,1,0 gives the train split none of the 40 documents", 1),
    "empty validation file": (lambda w: _json(w, "small.json", "--valid-data", str(w["root"] / "empty.json")),
                              "--valid-data", 1),
    "nan split": (lambda w: ["--split", "nan,1,1"], "--split 'nan,1,1': weight 'nan' must be a finite", 1),
    "inf split": (lambda w: ["--split", "inf,1,0"], "weight 'inf' must be a finite", 1),
    "overflowing split": (lambda w: ["--split", "1e308,1e308,1"], "sum to inf (overflow)", 1),
    "nan blend weight": (lambda w: ["DATA", "nan", str(w["root"] / "good_text_document"), "1",
                                    str(w["root"] / "good_text_document")], "weight 'nan' must be a finite", 1),
    "overflowing blend weights": (lambda w: ["DATA", "1e308", str(w["root"] / "good_text_document"), "1e308",
                                             str(w["root"] / "good_text_document")], "sum to inf (overflow)", 1),
    "indexed train split without documents": (lambda w: ["DATA", str(w["root"] / "good_text_document"),
                                                         "--split", "0,0,1"], "gives the train split none", 1),
    "deepspeed lr not a number": (lambda w: _ds(w["root"], {"optimizer": {"type": "Adam", "params": {"lr": "fast"}}}),
                                  "optimizer.params.lr must be a finite, positive number", 1),
    "negative deepspeed clipping": (lambda w: _ds(w["root"], {"gradient_clipping": -1}),
                                    "gradient_clipping must be a finite, non-negative number", 1),
    "nccl without a gpu": (lambda w: ["--distributed-backend", "nccl"], "nccl needs CUDA GPUs", 1),
    "no-save-optim under deepspeed": (lambda w: ["--no-save-optim"] + _ds(w["root"], {"zero_optimization": {"stage": 1}}),
                                      "--no-save-optim is not supported with --deepspeed", 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case: str, workspace: dict[str, Path]) -> None:
    extra_fn, message, nprocs = CASES[case]
    extra = extra_fn(workspace)
    args = TINY_GPT2 + ["--batch-size", "2", "--train-iters", "4"]
    if extra and extra[0] == "DATA":
        flags = next((i for i, word in enumerate(extra) if word.startswith("--")), len(extra))
        args, extra = _data_path(args, extra[1:flags]), extra[flags:]
    before = tree_digest(workspace["ckpt"]), tree_digest(workspace["corrupt"])
    out = _run(args + extra, nprocs)
    if nprocs == 1:
        assert out.returncode == 2, f"exit {out.returncode}\n{out.stdout[-1500:]}\n{out.stderr[-3000:]}"
    else:  # torchrun exits 1 and reports its children's status
        assert out.returncode != 0 and "(exitcode: 2)" in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error")]
    assert errors and message in errors[0], out.stderr[-3000:]
    assert f'File "{REPO}' not in out.stderr, "a traceback of our code was printed"
    assert (tree_digest(workspace["ckpt"]), tree_digest(workspace["corrupt"])) == before


def test_compile_without_a_compiler_is_one_clear_line(demo_corpus: Path, tmp_path: Path) -> None:
    """--compile on CPU with no C++ compiler on PATH: told at start-up, not by inductor mid-step."""
    env = dict(ENV, PATH=str(tmp_path))  # an empty directory: no g++, no clang++
    out = run_script("pretrain_gpt2.py", [*TINY_GPT2, "--batch-size", "2", "--train-iters", "2", "--compile"],
                     timeout=300, check=False, env=env)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "error: --compile on CPU needs a C++ compiler (g++ or clang++) on PATH" in out.stderr
    assert f'File "{REPO}' not in out.stderr


@pytest.mark.parametrize("environ,message", [
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "99999"}, "MASTER_PORT='99999' is not a TCP port"),
    # Issue 16: a rank outside the world waited the whole 10-minute rendezvous timeout.
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 must be in [0, 0] for WORLD_SIZE=1"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": ""}, "MASTER_ADDR is set but empty"),
], ids=["rank text", "port out of range", "rank outside the world", "world of 0", "empty master addr"])
def test_bad_launch_environment_is_one_clear_line(environ: dict[str, str], message: str, demo_corpus: Path,
                                                  tmp_path: Path) -> None:
    """A bad launcher variable: one line, exit 2, no traceback, no --save written (the previous
    version printed one line for these too)."""
    save = tmp_path / "ckpt"
    out = run_script("pretrain_gpt2.py", [*TINY_GPT2, "--batch-size", "2", "--train-iters", "2", "--save", str(save),
                                          "--exp-dir", str(tmp_path / "exp")],
                     timeout=300, check=False, env=dict(ENV, **environ))
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert not any(save.iterdir()) and not (tmp_path / "exp").exists()


def test_a_read_only_data_directory_is_one_clear_line(workspace: dict[str, Path], tmp_path: Path) -> None:
    """--data-path in a read-only directory with no sample-index cache yet was an OSError traceback
    creating .index-cache; now one line pointing at --cache-dir, and --cache-dir makes it work."""
    data = tmp_path / "ro"
    data.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(workspace["root"] / f"good_text_document{suffix}", data / f"good_text_document{suffix}")
    mounted = subprocess.run(["mount", "--bind", str(data), str(data)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount a read-only directory here: {mounted.stderr.decode().strip()}")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(data)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        args = _data_path(TINY_GPT2 + ["--batch-size", "2", "--train-iters", "2"], [str(data / "good_text_document")])
        out = _run(args)
        assert out.returncode == 2, out.stderr[-3000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("error")]
        assert errors and f"cannot write the cache {data}/good_text_document.index-cache" in errors[0]
        assert "pass --cache-dir" in errors[0] and "Traceback" not in out.stderr
        assert _run(args + ["--cache-dir", str(tmp_path / "cache")]).returncode == 0
    finally:
        subprocess.run(["umount", str(data)], capture_output=True)
