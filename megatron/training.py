"""The training loop shared by the Megatron and DeepSpeed paths (and by GPT-2 and BERT).

``pretrain(args, model_provider, data_provider, forward_step)`` runs start-up, training with
periodic logging, validation and checkpoints, and a final test evaluation. The path-specific
work happens in the backend (``megatron.backends``), so this loop reads the same for both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron.backends import average_over_data_parallel, build_backend
from megatron.checkpointing import load_checkpoint, save_checkpoint
from megatron.errors import ConfigError, TrainingAborted
from megatron.flops import model_flops_per_token, training_peak_tflops, utilization
from megatron.initialize import initialize_megatron
from megatron.providers import global_batch_size
from megatron.rng import set_rng_states
from megatron.signals import ExitConditions
from megatron.timers import Timers, memory_report

ForwardStepFunc = Callable[[Iterator | None, nn.Module, argparse.Namespace], torch.Tensor]


def print_rank_0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


@dataclass
class TrainState:
    """Counters of the run. The per-step outcomes (loss, skip, gradient norm) stay 0-dim device
    tensors and are read on the host only at log intervals and before checkpoints."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0  # up to the last log line
    interval_loss: torch.Tensor | None = None  # sum of the applied steps' losses since the last log line
    interval_iterations: int = 0
    interval_skipped: torch.Tensor | None = None
    consecutive_skipped: torch.Tensor | None = None  # the current run of skipped steps
    longest_skipped_run: torch.Tensor | None = None  # since the last check
    stopped_early: bool = False
    last_grad_norm: torch.Tensor | None = None
    last_skipped: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _git(*command: str) -> str:
    try:
        out = subprocess.run(["git", *command], capture_output=True, text=True, timeout=30,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def record_experiment(args: argparse.Namespace) -> None:
    """Rank 0 writes hparams.json, githash.log and gitdiff.log into the experiment directory."""
    if dist.get_rank() != 0:
        return
    if args.exp_dir is None:
        args.exp_dir = os.path.join("experiments", time.strftime("gpt2-%Y%m%d-%H%M%S"))
    os.makedirs(args.exp_dir, exist_ok=True)
    hparams = {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v))
               for k, v in sorted(vars(args).items())}
    with open(os.path.join(args.exp_dir, "hparams.json"), "w") as handle:
        json.dump(hparams, handle, indent=2)
    with open(os.path.join(args.exp_dir, "githash.log"), "w") as handle:
        handle.write(_git("rev-parse", "HEAD"))
    with open(os.path.join(args.exp_dir, "gitdiff.log"), "w") as handle:
        handle.write(_git("diff", "HEAD"))


def build_tensorboard_writer(args: argparse.Namespace) -> Any:
    if args.tensorboard_dir is None or dist.get_rank() != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=args.tensorboard_dir)


def _log_line(args: argparse.Namespace, state: TrainState, backend: Any, elapsed: float, skipped: int) -> str:
    iterations = max(state.interval_iterations, 1)
    applied = state.interval_iterations - skipped
    loss = (state.interval_loss / applied).item() if state.interval_loss is not None and applied else float("nan")
    ms_per_iter = elapsed * 1000.0 / iterations
    tokens_per_s = global_batch_size(args) * args.seq_length / max(elapsed / iterations, 1e-9)
    flops = model_flops_per_token(args.num_layers, args.hidden_size, args.seq_length, args.padded_vocab_size)
    tflops_per_device = tokens_per_s * flops / args.world_size / 1e12
    mfu = utilization(tokens_per_s, flops, args.world_size, state.extras.get("peak_tflops"))
    grad_norm = "n/a" if state.extras["grad_norm"] is None else f"{state.extras['grad_norm']:.3E}"
    state.extras.update(loss=loss, tokens_per_s=tokens_per_s, tflops=tflops_per_device)
    return (f" iteration {state.iteration:8d}/{args.train_iters:8d} |"
            f" elapsed time per iteration (ms): {ms_per_iter:.1f} |"
            f" learning rate {backend.learning_rate():.3E} |"
            f" lm loss {loss:.6E} |"
            f" loss scale {backend.loss_scale():.1f} |"
            f" grad norm {grad_norm} |"
            f" number of skipped iterations {skipped:3d} |"
            f" tokens/s {tokens_per_s:.1f} |"
            f" TFLOP/s per device {tflops_per_device:.3f} |"
            f" MFU {'n/a' if mfu is None else f'{mfu:.2%}'} |")


def _write_scalars(writer: Any, state: TrainState, backend: Any) -> None:
    if writer is None:
        return
    step = state.iteration
    writer.add_scalar("lm loss", state.extras["loss"], step)
    writer.add_scalar("learning rate", backend.learning_rate(), step)
    writer.add_scalar("loss scale", backend.loss_scale(), step)
    if state.extras["grad_norm"] is not None:
        writer.add_scalar("grad norm", state.extras["grad_norm"], step)
    writer.add_scalar("tokens per second", state.extras["tokens_per_s"], step)
    writer.add_scalar("TFLOP/s per device", state.extras["tflops"], step)
    writer.flush()


def evaluate(forward_step: ForwardStepFunc, data_iterator: Iterator | None, backend: Any,
             args: argparse.Namespace) -> float:
    """Mean loss over ``--eval-iters`` batches, averaged over data-parallel ranks."""
    backend.eval()
    total = torch.zeros((), device=args.device)
    with torch.no_grad():
        for _ in range(args.eval_iters):
            total += backend.eval_loss(forward_step, data_iterator).detach().float()
    backend.train()
    return average_over_data_parallel(total / max(args.eval_iters, 1)).item()


def evaluate_and_print_results(prefix: str, forward_step: ForwardStepFunc, data_iterator: Iterator | None,
                               backend: Any, args: argparse.Namespace, writer: Any = None,
                               iteration: int = 0) -> float | None:
    """Every rank calls it; ranks other than model-parallel rank 0 pass a None iterator."""
    loss = evaluate(forward_step, data_iterator, backend, args)
    ppl = math.exp(min(20.0, loss))
    line = f" validation loss at {prefix} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
    print_rank_0("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
    if writer is not None:
        writer.add_scalar("validation loss", loss, iteration)
        writer.add_scalar("validation ppl", ppl, iteration)
    return loss


def _inject_nan_iterations() -> set[int]:
    """Test-only hook: MEGATRON_TEST_INJECT_NAN="3,4" or "5-" makes those iterations' loss NaN."""
    spec = os.environ.get("MEGATRON_TEST_INJECT_NAN", "")
    iterations: set[int] = set()
    for part in filter(None, spec.split(",")):
        if part.endswith("-"):
            iterations.update(range(int(part[:-1]), 10**7))
        else:
            iterations.add(int(part))
    return iterations


def _accumulate(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def _record_step(state: TrainState, result: Any, args: argparse.Namespace) -> None:
    """Fold one step's outcome into the counters, on the device (nothing is read here)."""
    state.iteration += 1
    state.consumed_samples += global_batch_size(args)
    state.interval_iterations += 1
    skipped = result.skipped.to(result.loss.device)
    state.last_grad_norm, state.last_skipped = result.grad_norm, skipped
    state.interval_skipped = _accumulate(state.interval_skipped, skipped)
    # where, not a product: a skipped step's loss may be NaN
    state.interval_loss = _accumulate(state.interval_loss, torch.where(skipped.bool(), 0.0, result.loss))
    run = _accumulate(state.consecutive_skipped, torch.ones_like(skipped)) * skipped
    state.consecutive_skipped = run
    state.longest_skipped_run = run if state.longest_skipped_run is None else torch.maximum(state.longest_skipped_run, run)


def _check_skips(state: TrainState, args: argparse.Namespace) -> None:
    """Persistent non-finite values stop the run (fp16 overflow is the loss scaler's business).

    Called at log intervals and before every checkpoint (it reads the device), so a run of
    ``--max-skipped-steps`` skipped steps stops the run before anything is saved after it.
    """
    if state.longest_skipped_run is None:
        return
    longest = int(state.longest_skipped_run.item())
    state.longest_skipped_run = state.consecutive_skipped
    if not args.fp16 and longest >= args.max_skipped_steps:
        raise TrainingAborted(
            f"{longest} consecutive iterations (up to {state.iteration}) had a non-finite "
            f"loss or gradient norm and were skipped (--max-skipped-steps {args.max_skipped_steps}); "
            "no checkpoint was written with them: lower --lr, check the data, or resume from the last checkpoint")


def _log_interval(args: argparse.Namespace, state: TrainState, backend: Any, writer: Any,
                  timers: Timers, elapsed: float) -> None:
    """The one place a step's outcome is read on the host (besides checkpoints)."""
    skipped = int(state.interval_skipped.item()) if state.interval_skipped is not None else 0
    state.skipped_iterations += skipped
    last_skipped = state.last_skipped is not None and bool(state.last_skipped.item())
    state.extras["grad_norm"] = (None if state.last_grad_norm is None or last_skipped
                                 else float(state.last_grad_norm.item()))
    print_rank_0(_log_line(args, state, backend, elapsed, skipped))
    _write_scalars(writer, state, backend)
    if args.log_timers:
        print_rank_0(timers.log_string(["step"], normalizer=state.interval_iterations))
    if state.iteration == args.log_interval:
        print_rank_0(memory_report(f"after {state.iteration} iterations"))
    state.interval_loss, state.interval_iterations, state.interval_skipped = None, 0, None


def train(forward_step: ForwardStepFunc, backend: Any, train_iterator: Iterator | None,
          valid_iterator: Iterator | None, args: argparse.Namespace, state: TrainState) -> TrainState:
    timers = Timers(synchronize=args.log_timers)
    writer = build_tensorboard_writer(args)
    exits = ExitConditions(args)
    nan_iterations = _inject_nan_iterations()
    peak, source = training_peak_tflops(args)  # once, before the timed loop (~0.2 s on CPU)
    state.extras["peak_tflops"] = peak
    print_rank_0(f" > peak TFLOP/s per device for MFU: {peak:.3f} ({source}, {args.params_dtype})")
    backend.train()
    interval_start = time.perf_counter()
    while state.iteration < args.train_iters:
        poison = float("nan") if state.iteration + 1 in nan_iterations else 1.0
        timers("step").start()
        result = backend.train_step(
            lambda poison=poison: forward_step(train_iterator, backend.model, args) * poison,
            args.gradient_accumulation_steps, train_iterator)
        timers("step").stop()
        _record_step(state, result, args)
        if state.iteration % args.log_interval == 0:
            _check_skips(state, args)
            _log_interval(args, state, backend, writer, timers, time.perf_counter() - interval_start)
            interval_start = time.perf_counter()
        stop = exits.should_exit(state.iteration)
        if args.save and (state.iteration % args.save_interval == 0 or stop):
            _check_skips(state, args)
            save_checkpoint(args, backend, state.iteration, state.consumed_samples)
            interval_start = time.perf_counter()
        if stop:
            print_rank_0(f" exiting at iteration {state.iteration} ({exits.reason})"
                         + (", checkpoint saved" if args.save else ""))
            state.stopped_early = True
            break
        if args.do_valid and state.iteration % args.eval_interval == 0:
            evaluate_and_print_results(f"iteration {state.iteration}", forward_step, valid_iterator,
                                       backend, args, writer, state.iteration)
            interval_start = time.perf_counter()
    if not state.stopped_early:
        _check_skips(state, args)  # before the final checkpoint
    if writer is not None:
        writer.close()
    return state


def pretrain(args: argparse.Namespace, model_provider: Callable[[argparse.Namespace], nn.Module],
             data_provider: Callable[[argparse.Namespace, int], tuple[Any, Any, Any]],
             forward_step: ForwardStepFunc) -> TrainState:
    """Start-up, training, checkpoints and evaluation; every rank calls it.

    ``data_provider(args, consumed_samples)`` returns the train/valid/test iterators (None on
    ranks that do not read data) and sets ``args.do_valid`` / ``args.do_test`` on every rank.
    """
    initialize_megatron(args)
    record_experiment(args)
    model = model_provider(args)
    backend = build_backend(model, args)
    state, rng_states = TrainState(), None
    if args.load:
        state.iteration, state.consumed_samples, rng_states = load_checkpoint(args, backend)
    print_rank_0(f" > training with {args.world_size} ranks: model parallel {args.model_parallel_size}, "
                 f"data parallel {args.data_parallel_size}, global batch {global_batch_size(args)}, "
                 f"backend {backend.name}")
    train_iterator, valid_iterator, test_iterator = data_provider(args, state.consumed_samples)
    if rng_states is not None:
        # Start-up (data loaders, DeepSpeed's pipeline engine) may draw from the generators:
        # restore the saved streams last, so the next step draws what it drew in the saved run.
        set_rng_states(rng_states)
    if state.iteration < args.train_iters:
        state = train(forward_step, backend, train_iterator, valid_iterator, args, state)
        if state.stopped_early:
            return state
        if args.save and state.iteration % args.save_interval != 0:
            save_checkpoint(args, backend, state.iteration, state.consumed_samples)
    if args.do_valid:
        evaluate_and_print_results(f"the end of training for val data | iteration {state.iteration}",
                                   forward_step, valid_iterator, backend, args)
    if args.do_test:
        evaluate_and_print_results("the end of training for test data", forward_step, test_iterator,
                                   backend, args)
    return state


def _is_user_error(error: BaseException) -> bool:
    # Data and tokenizer errors subclass ConfigError; plain ValueErrors come from argument
    # validation helpers (--split, --data-path weights, ...).
    return isinstance(error, ConfigError) or type(error) is ValueError


def _is_collective_failure(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, dist.DistBackendError) or any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                      "timed out", "Timed out", "NCCL", "gloo"))


def run_entry_point(run: Callable[[], None]) -> int:
    """Run a training entry point; user errors and aborts become one line on stderr.

    Exit status: 0 done, 2 bad input (nothing was written), 1 training aborted or a collective
    failed (most likely another rank died: its log has the cause).
    """
    rank = os.environ.get("RANK", "0")
    prefix = "error" if rank == "0" else f"error (rank {rank})"
    try:
        run()
        return 0
    except TrainingAborted as error:
        print(f"{prefix}: {error}", file=sys.stderr, flush=True)
        return 1
    except Exception as error:  # noqa: BLE001 - sorted below, anything else re-raised
        if _is_user_error(error):
            print(f"{prefix}: {error}", file=sys.stderr, flush=True)
            return 2
        if _is_collective_failure(error):
            print(f"{prefix}: a collective operation failed ({type(error).__name__}: {str(error)[:200]}); "
                  "another rank most likely died or hung: check the other ranks' logs", file=sys.stderr,
                  flush=True)
            return 1
        raise
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the group may be broken after a failure
                pass
