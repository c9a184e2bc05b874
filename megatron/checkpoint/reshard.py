"""Resuming a checkpoint at another topology: which way, and the staged universal copy.

``plan_resume`` compares the topology a checkpoint was saved at (its manifest records it; older
checkpoints are read from their file names) with this run's:

- ``NATIVE``: the backend loads the files as they are (same path, same partition layout);
- ``DEEPSPEED_UNIVERSAL``: a DeepSpeed checkpoint at another data-parallel size or ZeRO stage,
  through DeepSpeed's own ``ds_to_universal`` (``megatron.backends.deepspeed_universal``);
- ``UNIVERSAL_COPY``: everything else this codebase reads (another tensor- or pipeline-parallel
  size, the other training path), through our universal copy (``megatron.checkpoint.universal``).

Both conversions run on rank 0 into ``--save/.reshard-<pid>`` (the run holds the writer lock of
``--save``; ``--load`` is never written) and the copy is removed after the load, also when it
fails. A killed load leaves it behind; the next run on ``--save`` removes it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Callable, Iterator

import torch.distributed as dist

from megatron.checkpoint.convert import read_checkpoint_directory
from megatron.checkpoint.layout import StateCheck, Topology, read_manifest, write_failure
from megatron.checkpoint.protocol import run_model_config
from megatron.checkpoint.universal import EMBEDDING, write_universal
from megatron.checkpoint.zero_state import trusted_load
from megatron.config import RunConfig
from megatron.errors import ConfigError, TrainingAborted

NATIVE, DEEPSPEED_UNIVERSAL, UNIVERSAL_COPY = "native", "deepspeed-universal", "universal-copy"


def _inferred_topology(directory: str, current: Topology) -> Topology | None:
    """The topology of a checkpoint written before manifests recorded it, from its file names:
    Megatron writes a folder per model-parallel rank; DeepSpeed's ZeRO 3 a model-states file per
    rank, ZeRO 1/2 an optimizer file per data-parallel rank (stages 1 and 2 share a layout: the
    current stage is assumed), stage 0 neither."""
    megatron = glob.glob(os.path.join(directory, "mp_rank_[0-9][0-9]", "model_optim_rng.pt"))
    if megatron:
        return Topology("megatron", 0, current.data_parallel_size, len(megatron), 1)
    zero3 = glob.glob(os.path.join(directory, "zero_pp_rank_*_mp_rank_00_model_states.pt"))
    optim = glob.glob(os.path.join(directory, "*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    models = glob.glob(os.path.join(directory, "mp_rank_*_model_states.pt"))
    mp_size = max(len(models), 1)
    if glob.glob(os.path.join(directory, "layer_*-model_*-model_states.pt")):
        config = trusted_load(os.path.join(directory, "mp_rank_00_model_states.pt")).get("model_config", {})
        pipe_size = int(config.get("pipe_parallel_size", 1))
        return Topology("deepspeed-pipeline", 1 if optim else 0, max(len(optim), 1), mp_size // pipe_size, pipe_size)
    if zero3:
        return Topology("deepspeed", 3, len(zero3), mp_size, 1)
    if optim:
        stage = current.zero_stage if current.zero_stage in (1, 2) else 1
        return Topology("deepspeed", stage, len(optim), mp_size, 1)
    if models:  # stage 0: the optimizer is whole in the model-states file, at any data-parallel size
        return Topology("deepspeed", 0, current.data_parallel_size, mp_size, 1)
    return None


def saved_topology(directory: str, current: Topology) -> Topology | None:
    """How the checkpoint in ``directory`` was laid out; None when unknown (loaded natively)."""
    manifest = read_manifest(directory)
    recorded = manifest.topology if manifest is not None else None
    return recorded if recorded is not None else _inferred_topology(directory, current)


def _partition_layout(topology: Topology) -> tuple[str, int, int, int, int]:
    """What decides whether a backend reads the files as they are: the path, the tensor and
    pipeline sizes and, on the DeepSpeed path, the ZeRO partitions (ZeRO 0 has none, 1 and 2 share
    one, 3 another; the data-parallel size sets their number)."""
    family = "megatron" if topology.path == "megatron" else "deepspeed"
    if family == "megatron" or topology.zero_stage == 0:
        return family, topology.model_parallel_size, topology.pipe_parallel_size, 0, 1
    kind = 3 if topology.zero_stage == 3 else 1
    return family, topology.model_parallel_size, topology.pipe_parallel_size, kind, topology.data_parallel_size


def plan_resume(saved: Topology | None, current: Topology, directory: str) -> str:
    """``NATIVE``, ``DEEPSPEED_UNIVERSAL`` or ``UNIVERSAL_COPY``; a ConfigError naming both
    topologies and what to launch instead for a target that cannot take another topology."""
    if saved is None or _partition_layout(saved) == _partition_layout(current):
        return NATIVE
    deepspeed_both = saved.path != "megatron" and current.path != "megatron"
    unpartitioned = (saved.model_parallel_size, saved.pipe_parallel_size, current.model_parallel_size,
                     current.pipe_parallel_size) == (1, 1, 1, 1)
    if deepspeed_both and unpartitioned and 0 not in (saved.zero_stage, current.zero_stage):
        return DEEPSPEED_UNIVERSAL
    if current.path != "megatron" and current.zero_stage == 0:
        raise unsupported(saved, current, directory, "a DeepSpeed ZeRO stage 0 run does not load universal "
                          "checkpoints: launch at ZeRO stage 1, 2 or 3, or on the Megatron path (without "
                          "--deepspeed)")
    return UNIVERSAL_COPY


def unsupported(saved: Topology, current: Topology, directory: str, fix: str) -> ConfigError:
    return ConfigError(f"checkpoint {directory} was saved at {describe(saved)}; this run is {describe(current)}: "
                       f"that change is not supported: {fix}")


def describe(topology: Topology) -> str:
    """``topology`` in words, the training path first (the Megatron path has no ZeRO stage)."""
    if topology.path == "megatron":
        return (f"the Megatron path, data parallel {topology.data_parallel_size}, model parallel "
                f"{topology.model_parallel_size}")
    path = "DeepSpeed's pipeline engine" if topology.path == "deepspeed-pipeline" else "DeepSpeed"
    return f"{path}, {topology.describe()}"


def _scratch_root(run: RunConfig) -> str:
    """Where a converted copy is staged: under ``--save`` (this run holds its writer lock).
    Every rank checks ``--save`` (it is configuration), so a refusal stops them all."""
    if not run.checkpoint.save:
        raise ConfigError("resuming a checkpoint at another topology stages a converted copy under --save: "
                          "pass --save")
    return os.path.join(run.checkpoint.save, f".reshard-{os.getpid()}")


def _conversion_failure(error: BaseException, save: str) -> tuple[str, bool]:
    """(message, the user's fault) for a failed conversion: a failed write (a full disk) is not."""
    if isinstance(error, ConfigError):
        return str(error), True
    written = write_failure(error, save) if isinstance(error, OSError | RuntimeError) else None
    if written is not None:
        return f"the converted copy could not be written under --save {save}: {written}", False
    return f"{type(error).__name__}: {str(error)[:300]}", True


@contextlib.contextmanager
def staged_copy(run: RunConfig, root: str, tag: str, what: str, convert: Callable[[str], None]) -> Iterator[str]:
    """Rank 0 runs ``convert(output)``; every rank then gets ``output`` (``<scratch>/<tag>``) or
    the same error; the scratch directory is removed on the way out. Every rank calls it."""
    scratch = [_scratch_root(run)]
    dist.broadcast_object_list(scratch, src=0)
    output = os.path.join(scratch[0], tag)
    failure: list[tuple[str, bool] | None] = [None]
    if dist.get_rank() == 0:
        shutil.rmtree(scratch[0], ignore_errors=True)
        try:
            convert(output)
        except Exception as error:  # noqa: BLE001 - reported on every rank below
            failure = [_conversion_failure(error, run.checkpoint.save)]
    dist.broadcast_object_list(failure, src=0)
    try:
        if failure[0] is not None:
            message, users = failure[0]
            text = f"{os.path.join(root, tag)} could not be converted ({what}): {message}"
            raise ConfigError(text) if users else TrainingAborted(text)
        yield output
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(scratch[0], ignore_errors=True)


def universal_copy_converter(directory: str, run: RunConfig, current: Topology, load_optimizer: bool,
                             validate: StateCheck) -> Callable[[str], None]:
    """``convert(output)`` writing the universal copy of ``directory`` for this run (rank 0):
    the checkpoint's model shape and tokenizer are checked (``validate``) before anything is
    written."""
    target_config = run_model_config(run)

    def convert(output: str) -> None:
        checkpoint = read_checkpoint_directory(directory, deepspeed_optimizer=True)
        if EMBEDDING not in checkpoint.model:
            raise ConfigError(f"checkpoint {directory} is not a GPT-2 checkpoint (a BERT one?): only GPT-2 "
                              "checkpoints resume at another tensor- or pipeline-parallel size or on the other "
                              "path; resume it at its saved topology")
        topology_keys = ("model_parallel_size", "pipe_parallel_size", "padded_vocab_size")
        validate({"model_config": {**checkpoint.model_config,
                                   **{key: target_config[key] for key in topology_keys if key in target_config}}})
        if load_optimizer and checkpoint.optimizer is None and checkpoint.iteration > 0:
            raise ConfigError(f"checkpoint {directory} holds no optimizer state (saved with --no-save-optim): pass "
                              "--no-load-optim to start a fresh optimizer and learning-rate schedule from its "
                              "weights and iteration, or --finetune to start over at iteration 0")
        write_universal(checkpoint, output, current, target_config, run.training.seed)

    return convert


def rng_note(saved: Topology, current: Topology) -> str | None:
    """What the log says when the per-rank RNG streams could not be carried over."""
    if saved.model_parallel_size == current.model_parallel_size:
        return None
    return (f" note: the model-parallel RNG streams (attention dropout) cannot be mapped from model parallel "
            f"{saved.model_parallel_size} to {current.model_parallel_size}: re-seeded as a fresh run seeds them "
            "(--seed + 2718 + model-parallel rank); the other generators continue from the checkpoint")


def announce(directory: str, saved: Topology, current: Topology, load_optimizer: bool, how: str) -> None:
    """Rank 0 logs what was resharded, and the RNG note."""
    if dist.get_rank() != 0:
        return
    what = ("weights, fp32 master weights, Adam moments and step, learning-rate schedule" if load_optimizer
            else "weights only (--no-load-optim/--finetune)")
    print(f" resharded checkpoint {directory}: {describe(saved)} -> {describe(current)}, through {how} ({what})",
          flush=True)
    note = rng_note(saved, current)
    if note:
        print(note, flush=True)
