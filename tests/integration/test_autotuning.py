"""DeepSpeed's autotuner drives pretrain_gpt2.py (issue 20): ``deepspeed --autotuning tune``
profiles the model, runs its experiments (each a launch of this entry point with the experiment's
config passed inline as base64 and the micro batch through ``arg_mappings``), and writes the best
configuration. On this project's CPU ranks, with the DeepSpeed CPU accelerator."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from launchers import ENV, REPO, TINY_GPT2, free_port


def _autotuning_config(tmp_path: Path) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "zero_optimization": {"stage": 1},
        "autotuning": {
            "enabled": True, "fast": True, "results_dir": str(tmp_path / "results"),
            "exps_dir": str(tmp_path / "exps"), "start_profile_step": 2, "end_profile_step": 3,
            "max_train_micro_batch_size_per_gpu": 4, "num_tuning_micro_batch_sizes": 2,
            "arg_mappings": {"train_micro_batch_size_per_gpu": "--batch-size",
                             "gradient_accumulation_steps": "--gradient-accumulation-steps"},
        },
    }


def test_deepspeed_autotuning_tunes_the_micro_batch(demo_corpus: Path, tmp_path: Path) -> None:
    config = tmp_path / "ds_autotuning.json"
    config.write_text(json.dumps(_autotuning_config(tmp_path)))
    launcher = shutil.which("deepspeed") or "deepspeed"
    command = [launcher, "--autotuning", "tune", "--num_gpus", "1",
               "--master_port", str(free_port()), str(REPO / "pretrain_gpt2.py"), *TINY_GPT2, "--batch-size", "1",
               "--train-iters", "20", "--deepspeed", "--deepspeed_config", str(config)]
    done = subprocess.run(command, cwd=tmp_path, env=dict(ENV, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    optimal = json.loads((tmp_path / "results" / "ds_config_optimal.json").read_text())
    assert isinstance(optimal["train_micro_batch_size_per_gpu"], int), optimal
    experiments = [path.parent for path in (tmp_path / "results").rglob("exp.json")]
    assert len(experiments) >= 2, experiments  # the model-info profile and at least one micro batch
    for experiment in experiments:
        stderr = (experiment / "stderr.log").read_text() if (experiment / "stderr.log").exists() else ""
        assert "Traceback" not in stderr and "error:" not in stderr, (experiment, stderr[-3000:])
        if experiment.name != "profile_model_info":  # each micro batch ran and stopped after its profile steps
            assert (experiment / "metrics.json").is_file(), experiment
    # The result trains: the optimal config with its micro batch as --batch-size.
    micro = str(optimal["train_micro_batch_size_per_gpu"])
    trained = subprocess.run([launcher, "--num_gpus", "1",
                              "--master_port", str(free_port()), str(REPO / "pretrain_gpt2.py"), *TINY_GPT2,
                              "--batch-size", micro, "--train-iters", "2", "--deepspeed", "--deepspeed_config",
                              str(tmp_path / "results" / "ds_config_optimal.json")],
                             cwd=tmp_path, env=dict(ENV, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                             timeout=600)
    assert trained.returncode == 0 and "iteration        2/       2" in trained.stdout, trained.stderr[-3000:]
