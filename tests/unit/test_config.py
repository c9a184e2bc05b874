"""The RunConfig: every derived value worked out once from flags, tokenizer and launch
environment, before any process group exists; frozen afterwards; mistakes are ConfigErrors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from arguments import build_parser, build_run_config
from megatron.errors import ConfigError

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--max-position-embeddings", "32", "--batch-size", "2", "--train-iters", "20"]


def _world(size: int, rank: int = 0) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank), "MASTER_PORT": "29999"}


def _run(*flags: str, world: int = 1, vocab_size: int = 8000):
    args = build_parser().parse_args([*MODEL, *flags])
    return build_run_config(args, vocab_size=vocab_size, eod_token=vocab_size - 1, environ=_world(world))


def _ds_config(tmp_path: Path, config: dict) -> list[str]:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return ["--deepspeed", "--deepspeed_config", str(path)]


def test_derived_values() -> None:
    run = _run("--model-parallel-size", "2", "--gradient-accumulation-steps", "3", world=8)
    assert (run.parallel.world_size, run.parallel.data_parallel_size) == (8, 4)
    assert run.model.vocab_size == 8000 and run.model.padded_vocab_size == 8192  # 128 x mp 2 = 256
    assert run.global_batch_size == 2 * 3 * 4
    assert run.optimizer.lr_decay_iters == 20 and run.training.eval_batch_size == 2
    assert run.precision.dtype == "fp32" and run.backend_name == "megatron"
    assert run.eod_token == 7999 and str(run.device) == "cpu"


def test_configuration_is_frozen() -> None:
    run = _run()
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.training.train_iters = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.model = run.model


def test_world_size_must_split_into_replicas() -> None:
    with pytest.raises(ConfigError, match=r"world size \(3\) is not divisible by --model-parallel-size \(2\)"):
        _run("--model-parallel-size", "2", world=3)


def test_deepspeed_batch_sizes_are_resolved_at_start_up(tmp_path: Path) -> None:
    run = _run(*_ds_config(tmp_path, {"train_batch_size": 16}), world=2)
    assert run.training.gradient_accumulation_steps == 4  # 16 / (micro 2 x dp 2)
    config = run.deepspeed.engine_config()
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (16, 2, 4)
    assert config["gradient_clipping"] == 1.0 and run.backend_name == "deepspeed"
    with pytest.raises(ConfigError, match="train_batch_size must equal --batch-size x gradient accumulation"):
        _run("--gradient-accumulation-steps", "3", *_ds_config(tmp_path, {"train_batch_size": 16}), world=2)


def test_auto_batch_keys_come_from_the_flags(tmp_path: Path) -> None:
    """"auto" (DeepSpeed's autotuner and Hugging Face write it) means: the flags decide."""
    auto = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto"}
    run = _run("--gradient-accumulation-steps", "3", *_ds_config(tmp_path, auto), world=2)
    config = run.deepspeed.engine_config()
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (12, 2, 3)
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu must be a positive integer \(or \"auto\""):
        _run(*_ds_config(tmp_path, {"train_micro_batch_size_per_gpu": "automatic"}))


def test_an_inline_base64_config_is_read_as_deepspeed_reads_it(tmp_path: Path) -> None:
    """DeepSpeed's autotuner passes each experiment's config as URL-safe base64 JSON."""
    import base64

    inline = base64.urlsafe_b64encode(json.dumps({"zero_optimization": {"stage": 2},
                                                  "train_micro_batch_size_per_gpu": 2}).encode()).decode()
    run = _run("--deepspeed", "--deepspeed_config", inline)
    assert run.deepspeed.zero_stage == 2
    for not_a_config in ("bm90IGpzb24", base64.urlsafe_b64encode(b"[1, 2]").decode()):  # "not json", a list
        with pytest.raises(ConfigError, match="does not exist"):
            _run("--deepspeed", "--deepspeed_config", not_a_config)
    long_bad = base64.urlsafe_b64encode(json.dumps({"zero_optimization": {"stage": 7},
                                                    "comment": "x" * 80}).encode()).decode()
    with pytest.raises(ConfigError, match=r"^the inline \(base64\) DeepSpeed config: zero_optimization.stage must be"):
        _run("--deepspeed", "--deepspeed_config", long_bad)
    with pytest.raises(ConfigError, match="DeepSpeed config 'missing.json' does not exist"):
        _run("--deepspeed", "--deepspeed_config", "missing.json")
    truncated = inline[:-7] * 3  # a damaged blob: named briefly, not printed whole
    with pytest.raises(ConfigError, match=r"\.\.\. \(\d+ characters\) is neither an existing file nor a base64"):
        _run("--deepspeed", "--deepspeed_config", truncated)


@pytest.mark.parametrize("section", ["fp16", "bf16"])
def test_auto_is_not_read_as_a_precision(section: str, tmp_path: Path) -> None:
    """Hostile finding: {"bf16": {"enabled": "auto"}} was truthy, so it turned bf16 on."""
    with pytest.raises(ConfigError, match=rf"{section}.enabled must be true or false, got 'auto'"):
        _run(*_ds_config(tmp_path, {section: {"enabled": "auto"}}))


def test_engine_config_is_a_fresh_copy(tmp_path: Path) -> None:
    run = _run(*_ds_config(tmp_path, {"zero_optimization": {"stage": 2}}))
    run.deepspeed.engine_config()["zero_optimization"]["stage"] = 3
    assert run.deepspeed.zero_stage == 2


def test_deepspeed_precision_comes_from_flags_or_config(tmp_path: Path) -> None:
    run = _run(*_ds_config(tmp_path, {"bf16": {"enabled": True}}))
    assert run.precision.dtype == "bf16"
    run = _run("--bf16", *_ds_config(tmp_path, {}))
    assert run.precision.bf16 and run.deepspeed.engine_config()["bf16"] == {"enabled": True}
    with pytest.raises(ConfigError, match="--fp16 is given but the DeepSpeed config disables fp16"):
        _run("--fp16", *_ds_config(tmp_path, {"fp16": {"enabled": False}}))


def test_nccl_without_gpus_is_refused_before_the_process_group() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    with pytest.raises(ConfigError, match="nccl needs CUDA GPUs"):
        _run("--distributed-backend", "nccl")


def test_vocab_size_flag_overrides_the_tokenizer() -> None:
    run = _run("--vocab-size", "100", "--make-vocab-size-divisible-by", "64")
    assert (run.model.vocab_size, run.model.padded_vocab_size) == (100, 128)


@pytest.mark.parametrize("environ,message", [
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ({"RANK": "-1", "WORLD_SIZE": "1"}, r"RANK=-1 must be in \[0, 0\] for WORLD_SIZE=1"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, r"RANK=1 must be in \[0, 0\] for WORLD_SIZE=1"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, r"RANK=3 must be in \[0, 1\]"),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4", "MASTER_ADDR": "h"}, r"SLURM_PROCID=4 must be in \[0, 3\]"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": " "}, "MASTER_ADDR is set but empty"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE is not set"),
    ({"MASTER_PORT": "abc"}, "MASTER_PORT='abc' is not a TCP port"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "99999"}, "MASTER_PORT='99999' is not a TCP port"),
], ids=["rank text", "local rank text", "world 0", "negative rank", "rank 1 of 1", "rank past world", "slurm rank",
        "empty master addr", "mpi without size",
        "port text", "port out of range"])
def test_bad_launch_environment_is_a_config_error(environ: dict[str, str], message: str) -> None:
    """A launcher value that cannot form a process group is a user error at start-up (the previous
    version reported these as one line too; a traceback from int() or TCPStore is a regression)."""
    args = build_parser().parse_args(MODEL)
    with pytest.raises(ConfigError, match=message):
        build_run_config(args, vocab_size=8000, eod_token=7999, environ=environ)


def test_fp16_loss_scale_bounds_are_checked_with_the_flags() -> None:
    """--min-scale above --initial-loss-scale (or not positive) fails in get_args, before a model exists."""
    from arguments import validate_training_args

    for flags in (["--min-scale", "0"], ["--initial-loss-scale", "0.5"], ["--initial-loss-scale", "0"]):
        with pytest.raises(ConfigError, match=r"--min-scale \(.*\) must be positive and at most --initial-loss-scale"):
            validate_training_args(build_parser().parse_args([*MODEL, "--fp16", *flags]))
    validate_training_args(build_parser().parse_args([*MODEL, "--min-scale", "0"]))  # unused without --fp16
    validate_training_args(build_parser().parse_args([*MODEL, "--fp16", "--loss-scale", "8", "--min-scale", "0"]))


@pytest.mark.parametrize("config,message", [
    ({"train_batch_size": "8"}, r"train_batch_size must be a positive integer \(or \"auto\": from the flags\), got '8'"),
    ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps must be a positive integer \(or \"auto\": from the flags\), got 0"),
    ({"fp16": True}, "fp16 must be a JSON object"),
    ({"zero_optimization": [1]}, "zero_optimization must be a JSON object"),
    ({"zero_optimization": {"stage": "two"}}, "zero_optimization.stage must be 0, 1, 2 or 3, got 'two'"),
], ids=["batch text", "accumulation 0", "fp16 bool", "zero list", "stage text"])
def test_mistyped_deepspeed_config_is_a_config_error(config: dict, message: str, tmp_path: Path) -> None:
    """A value of the wrong type in the DeepSpeed JSON: one ConfigError naming the key, not a
    TypeError or AttributeError from the batch/precision rules or DeepSpeed's pydantic models."""
    with pytest.raises(ConfigError, match=message):
        _run(*_ds_config(tmp_path, config))


def test_pipeline_zero_stage_given_as_text(tmp_path: Path) -> None:
    """DeepSpeed takes "2" for stage 2: the pipeline check compares it as a number."""
    from arguments import validate_pipeline_args

    args = build_parser().parse_args([*MODEL, "--pipe-parallel-size", "2",
                                      *_ds_config(tmp_path, {"zero_optimization": {"stage": "2"}})])
    with pytest.raises(ConfigError, match="ZeRO stage 2 .* cannot be combined with pipeline parallelism"):
        validate_pipeline_args(args)
    assert _run(*_ds_config(tmp_path, {"zero_optimization": {"stage": "1"}})).deepspeed.zero_stage == 1


def test_pipeline_needs_one_micro_batch_shape(tmp_path: Path) -> None:
    """--eval-batch-size other than --batch-size under the pipeline engine aborted the ranks at
    the first evaluation (gloo: "Received data size doesn't match expected size", SIGABRT)."""
    from arguments import validate_pipeline_args

    flags = [*MODEL, "--pipe-parallel-size", "2", *_ds_config(tmp_path, {"zero_optimization": {"stage": 1}})]
    with pytest.raises(ConfigError, match=r"--eval-batch-size \(3\) must equal --batch-size \(2\)"):
        validate_pipeline_args(build_parser().parse_args([*flags, "--eval-batch-size", "3"]))
    validate_pipeline_args(build_parser().parse_args([*flags, "--eval-batch-size", "2"]))


@pytest.mark.parametrize("flags,message", [
    (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32 - 1\]"),
    (["--seed", str(2**32)], r"--seed must be in \[0, 2\*\*32 - 1\]"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--adam-beta1", "1.0"], r"--adam-beta1 must be in \[0, 1\)"),
    (["--adam-beta2", "-0.5"], r"--adam-beta2 must be in \[0, 1\)"),
    (["--adam-eps=-1e-8"], "--adam-eps must be >= 0"),
    (["--init-method-std", "-0.02"], "--init-method-std must be >= 0"),
])
def test_values_numpy_and_adamw_refuse_are_config_errors(flags: list[str], message: str) -> None:
    """These reached NumPy's seed or torch's AdamW, whose bare ValueError the previous version
    reported as one line; with only ConfigError a user error they must be checked at start-up."""
    from arguments import validate_model_args, validate_training_args

    args = build_parser().parse_args([*MODEL, *flags])
    with pytest.raises(ConfigError, match=message):
        validate_model_args(args)
        validate_training_args(args)


@pytest.mark.parametrize("world,deepspeed", [(1, False), (2, False), (4, False), (2, True), (4, True)])
def test_global_batch_size_derives_the_accumulation(world: int, deepspeed: bool, tmp_path: Path) -> None:
    """--global-batch-size keeps the global batch at any data-parallel size, on both paths."""
    flags = _ds_config(tmp_path, {"zero_optimization": {"stage": 1}}) if deepspeed else []
    run = _run("--global-batch-size", "16", *flags, world=world)
    assert run.global_batch_size == 16 and run.training.gradient_accumulation_steps == 16 // (2 * world)
    if deepspeed:
        assert json.loads(run.deepspeed.config_json)["train_batch_size"] == 16


@pytest.mark.parametrize("flags,message", [
    (["--global-batch-size", "6"], r"--global-batch-size 6 is not a multiple of --batch-size 2 x data-parallel "
                                    r"size 4 = 8"),
    (["--global-batch-size", "16", "--gradient-accumulation-steps", "1"],
     r"--gradient-accumulation-steps 1 contradicts --global-batch-size 16"),
])
def test_bad_global_batch_sizes(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _run(*flags, world=4)


def test_global_batch_size_against_the_deepspeed_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="batch sizes disagree"):
        _run("--global-batch-size", "16", *_ds_config(tmp_path, {"train_batch_size": 8}), world=2)


def test_global_batch_size_must_be_positive() -> None:
    from arguments import validate_training_args

    with pytest.raises(ConfigError, match=r"--global-batch-size must be positive, got 0"):
        validate_training_args(build_parser().parse_args([*MODEL, "--global-batch-size", "0"]))


def test_an_elastic_restart_is_known() -> None:
    args = build_parser().parse_args(MODEL)
    environ = {**_world(2), "TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_MAX_RESTARTS": "3"}
    run = build_run_config(args, vocab_size=8000, eod_token=7999, environ=environ)
    assert (run.parallel.restart_count, run.parallel.max_restarts) == (1, 3)
    assert _run().parallel.restart_count == 0


@pytest.mark.parametrize("environ,master", [
    ({"SLURM_JOB_NODELIST": "gpu[003-005,007],cpu1"}, "gpu003"),
    ({"SLURM_NODELIST": "node7,node8"}, "node7"),  # srun steps outside sbatch set only this one
    ({"SLURM_NODELIST": "a[1-2]b[3-4]"}, "a1b3"),
    ({"SLURM_NODELIST": "n[1-2]", "MASTER_ADDR": "head"}, "head"),
    ({"SLURM_JOB_NODELIST": "", "SLURM_NODELIST": "node-[1-2]-ib"}, "node-1-ib"),
    ({}, "127.0.0.1"),
], ids=["job list", "step list", "two ranges", "master addr wins", "empty job list", "no list"])
def test_slurm_master_is_the_first_host_of_the_node_list(environ: dict[str, str], master: str) -> None:
    from megatron.launch import read_launch_env

    launch = read_launch_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", **environ})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr) == (1, 2, 0, master)


@pytest.mark.parametrize("environ,noted", [
    ({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "job7"}, True),  # c10d, shared store
    ({"TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_RUN_ID": "job7"}, False),  # a store per round
    ({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "none"}, False),  # fixed master
    ({}, False),
], ids=["shared", "per round", "static", "no torchrun"])
def test_a_shared_rendezvous_store_is_noted(environ: dict[str, str], noted: bool) -> None:
    from megatron.launch import shared_rendezvous_store_note

    note = shared_rendezvous_store_note(environ)
    assert (note is not None) == noted and (note is None or "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in note)


@pytest.mark.parametrize("value,message", [("nan", "must be positive, got nan"),
                                           ("inf", "must be positive and finite, got inf")])
def test_save_interval_minutes_refuses_nan_and_inf(value: str, message: str) -> None:
    """nan passed the old `value <= 0` check and silently never saved."""
    from arguments import validate_training_args

    with pytest.raises(ConfigError, match=f"--save-interval-minutes {message}"):
        validate_training_args(build_parser().parse_args([*MODEL, "--save-interval-minutes", value]))


@pytest.mark.parametrize("nodelist", [",,,", "[bad", "]", "n[1-2", "n[]", "n[a-b]", "[1-2]", " n1 ,n2"])
def test_a_slurm_node_list_naming_no_host_is_a_config_error(nodelist: str) -> None:
    from megatron.launch import read_launch_env

    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST=.* names no host to rendezvous at"):
        read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": nodelist})


def test_a_global_batch_conflict_with_the_deepspeed_config_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--global-batch-size 8 \(gradient accumulation 4\).*gradient accumulation "
                                          r"differs; drop gradient_accumulation_steps"):
        _run("--batch-size", "2", "--global-batch-size", "8",
             *_ds_config(tmp_path, {"gradient_accumulation_steps": 2}))


def test_host_memory_is_kept_unless_released() -> None:
    """CPU runs keep freed host memory (megatron/host_memory.py); --release-host-memory opts out."""
    assert _run().training.keep_host_memory is True
    assert _run("--release-host-memory").training.keep_host_memory is False
