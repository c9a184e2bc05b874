"""The training loop shared by the Megatron and DeepSpeed paths (and by GPT-2 and BERT).

``pretrain(run, model_provider, data_provider, forward_step)`` runs start-up, training with
periodic logging, validation and checkpoints, and a final test evaluation. The path-specific
work happens in the backend (``megatron.backends``), so this loop reads the same for both.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megatron.backends import Backend, ForwardStep, PipelineBatchFn, StepResult, build_backend
from megatron.backends.base import average_over_data_parallel
from megatron.checkpoint.async_save import BackgroundSaver
from megatron.checkpoint.layout import Topology, checkpoint_tag
from megatron.checkpoint.protocol import load_checkpoint, open_save_directory, save_checkpoint
from megatron.checkpoint.reshard import saved_topology
from megatron.checkpoint.rng import set_rng_states
from megatron.config import ParallelConfig, RunConfig
from megatron.errors import TrainingAborted
from megatron.host_memory import keep_freed_host_memory
from megatron.launch import initialize_megatron, restart_counts, shared_rendezvous_store_note
from megatron.model.gpt2_pipe import PipelineDescription
from megatron.training.data import DataIterators, DataPosition, DataProvider
from megatron.training.exit import ExitConditions, TimedSaves
from megatron.training.flops import device_peak_tflops, model_flops_per_token, utilization
from megatron.training.log import (
    IntervalReport,
    hparams,
    log_line,
    print_rank_0,
    record_experiment,
    write_scalars,
)
from megatron.training.runlog import Outcome, RunLog, WandbSettings, summary_lines
from megatron.training.timers import Timers, memory_report
from megatron.training.watchdog import ProgressWatchdog

ModelProvider = Callable[[RunConfig], nn.Module | PipelineDescription]


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
    saved_iteration: int | None = None  # the iteration this run last checkpointed
    last_grad_norm: torch.Tensor | None = None
    last_skipped: torch.Tensor | None = None
    last_loss: float | None = None  # the newest finite lm loss of a log line
    last_loss_iteration: int | None = None  # that line's iteration
    last_loss_skipped: int = 0  # the skipped steps of that line's interval


class NanInjection:
    """Test-only hook: MEGATRON_TEST_INJECT_NAN="3,4" or "5-" makes the training loss of those
    iterations NaN (the trainer sets ``iteration`` around each training step)."""

    def __init__(self, forward_step: ForwardStep, iterations: set[int]) -> None:
        self.forward_step, self.iterations = forward_step, iterations
        self.iteration: int | None = None

    @staticmethod
    def from_environment(forward_step: ForwardStep) -> NanInjection | None:
        spec = os.environ.get("MEGATRON_TEST_INJECT_NAN", "")
        iterations: set[int] = set()
        for part in filter(None, spec.split(",")):
            if part.endswith("-"):
                iterations.update(range(int(part[:-1]), 10**7))
            else:
                iterations.add(int(part))
        return NanInjection(forward_step, iterations) if iterations else None

    def __call__(self, data_iterator: Iterator | None, model: nn.Module, run: RunConfig) -> torch.Tensor:
        loss = self.forward_step(data_iterator, model, run)
        return loss * float("nan") if self.iteration in self.iterations else loss


def evaluate(backend: Backend, data_iterator: Iterator | None, run: RunConfig,
             progress: Callable[[], None] | None = None) -> float:
    """Mean loss over ``--eval-iters`` batches, averaged over data-parallel ranks; ``progress()``
    after each batch (the progress watchdog's beat)."""
    eval_iters = run.training.eval_iters
    backend.eval()
    total = torch.zeros((), device=run.device)
    with torch.no_grad():
        for _ in range(eval_iters):
            total += backend.eval_loss(data_iterator).detach().float()
            if progress is not None:
                progress()
    backend.train()
    return average_over_data_parallel(total / max(eval_iters, 1)).item()


def evaluate_and_print_results(prefix: str, backend: Backend, data_iterator: Iterator | None, run: RunConfig,
                               writer: Any = None, iteration: int = 0,
                               progress: Callable[[], None] | None = None) -> float:
    """Every rank calls it; ranks other than model-parallel rank 0 pass a None iterator."""
    loss = evaluate(backend, data_iterator, run, progress)
    ppl = math.exp(min(20.0, loss))
    line = f" validation loss at {prefix} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
    print_rank_0("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
    if writer is not None:
        writer.add_scalar("validation loss", loss, iteration)
        writer.add_scalar("validation ppl", ppl, iteration)
    return loss


def _accumulate(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def _record_step(state: TrainState, result: StepResult, run: RunConfig) -> None:
    """Fold one step's outcome into the counters, on the device (nothing is read here)."""
    state.iteration += 1
    state.consumed_samples += run.global_batch_size
    state.interval_iterations += 1
    skipped = result.skipped.to(result.loss.device)
    state.last_grad_norm, state.last_skipped = result.grad_norm, skipped
    state.interval_skipped = _accumulate(state.interval_skipped, skipped)
    # where, not a product: a skipped step's loss may be NaN
    state.interval_loss = _accumulate(state.interval_loss, torch.where(skipped.bool(), 0.0, result.loss))
    streak = _accumulate(state.consecutive_skipped, torch.ones_like(skipped)) * skipped
    state.consecutive_skipped = streak
    state.longest_skipped_run = (streak if state.longest_skipped_run is None
                                 else torch.maximum(state.longest_skipped_run, streak))


def _check_skips(state: TrainState, run: RunConfig) -> None:
    """Persistent non-finite values stop the run (fp16 overflow is the loss scaler's business).

    Called at log intervals and before every checkpoint (it reads the device), so a run of
    ``--max-skipped-steps`` skipped steps stops the run before anything is saved after it.
    """
    if state.longest_skipped_run is None:
        return
    longest = int(state.longest_skipped_run.item())
    state.longest_skipped_run = state.consecutive_skipped
    limit = run.training.max_skipped_steps
    if not run.precision.fp16 and longest >= limit:
        raise TrainingAborted(
            f"{longest} consecutive iterations (up to {state.iteration}) had a non-finite "
            f"loss or gradient norm and were skipped (--max-skipped-steps {limit}); "
            "no checkpoint was written with them: lower --lr, check the data, or resume from the last checkpoint")


def interval_report(state: TrainState, backend: Backend, run: RunConfig, elapsed: float,
                    peak_tflops: float) -> IntervalReport:
    """The one place a step's outcome is read on the host (besides checkpoints)."""
    skipped = int(state.interval_skipped.item()) if state.interval_skipped is not None else 0
    iterations = max(state.interval_iterations, 1)
    applied = state.interval_iterations - skipped
    loss = (state.interval_loss / applied).item() if state.interval_loss is not None and applied else float("nan")
    last_skipped = state.last_skipped is not None and bool(state.last_skipped.item())
    grad_norm = None if state.last_grad_norm is None or last_skipped else float(state.last_grad_norm.item())
    model, seq_length = run.model, run.data.seq_length
    tokens_per_s = run.global_batch_size * seq_length / max(elapsed / iterations, 1e-9)
    flops = model_flops_per_token(model.num_layers, model.hidden_size, seq_length, model.padded_vocab_size)
    world_size = run.parallel.world_size
    return IntervalReport(
        iteration=state.iteration, ms_per_iteration=elapsed * 1000.0 / iterations,
        learning_rate=backend.learning_rate(), loss=loss, loss_scale=backend.loss_scale(), grad_norm=grad_norm,
        skipped=skipped, tokens_per_s=tokens_per_s, tflops_per_device=tokens_per_s * flops / world_size / 1e12,
        mfu=utilization(tokens_per_s, flops, world_size, peak_tflops))


def _log_interval(state: TrainState, backend: Backend, run: RunConfig, writer: Any, timers: Timers,
                  elapsed: float, peak_tflops: float) -> None:
    report = interval_report(state, backend, run, elapsed, peak_tflops)
    state.skipped_iterations += report.skipped
    if math.isfinite(report.loss):
        state.last_loss, state.last_loss_iteration, state.last_loss_skipped = report.loss, state.iteration, report.skipped
    print_rank_0(log_line(report, run.training.train_iters))
    write_scalars(writer, report)
    if run.logging.log_timers:
        print_rank_0(timers.log_string(["step"], normalizer=state.interval_iterations))
    if state.iteration == run.logging.log_interval:
        print_rank_0(memory_report(f"after {state.iteration} iterations"))
    state.interval_loss, state.interval_iterations, state.interval_skipped = None, 0, None


def train(backend: Backend, data: DataIterators, run: RunConfig, state: TrainState,
          nan_injection: NanInjection | None = None, watchdog: ProgressWatchdog | None = None,
          saver: BackgroundSaver | None = None, log: RunLog | None = None) -> TrainState:
    """Train from ``state`` to ``--train-iters`` (or an exit condition), with periodic logging,
    validation and checkpoints. Every rank calls it. ``watchdog``: a started progress watchdog
    (the caller's, to watch what follows too; else one for the loop alone). ``saver``: completes
    checkpoints in the background (``--async-save``); the caller waits for the last one. ``log``:
    where scalars and curves go (the caller's, which it closes; else one with only
    ``--tensorboard-dir``, closed here)."""
    logging = run.logging
    own_log = log is None
    log = run_log(run, None) if log is None else log
    peak, source = device_peak_tflops(run.precision.dtype, logging.peak_tflops)  # once (~0.2 s on CPU)
    print_rank_0(f" > peak TFLOP/s per device for MFU: {peak:.3f} ({source}, {run.precision.dtype})")
    backend.train()
    own = watchdog is None
    if watchdog is None:
        watchdog = progress_watchdog(run)
    try:
        return _train_loop(backend, data, run, state, nan_injection, watchdog, log, peak, saver)
    finally:
        if own:
            watchdog.stop()
        if own_log:
            log.close()


def _train_loop(backend: Backend, data: DataIterators, run: RunConfig, state: TrainState,
                nan_injection: NanInjection | None, watchdog: ProgressWatchdog, log: RunLog, peak: float,
                saver: BackgroundSaver | None) -> TrainState:
    """The loop of ``train``; ``watchdog`` hears of every step, checkpoint and evaluation."""
    training, logging, checkpoint = run.training, run.logging, run.checkpoint
    timers = Timers(synchronize=logging.log_timers)
    exits = ExitConditions(training)
    timed_saves = TimedSaves(checkpoint.save_interval_minutes)
    # An interval's time is its steps': checkpoints and evaluations inside it are left out.
    interval_start, paused = time.perf_counter(), 0.0

    def log_interval() -> None:
        nonlocal interval_start, paused
        _log_interval(state, backend, run, log, timers, time.perf_counter() - interval_start - paused, peak)
        interval_start, paused = time.perf_counter(), 0.0

    while state.iteration < training.train_iters:
        if nan_injection is not None:
            nan_injection.iteration = state.iteration + 1
        timers("step").start()
        result = backend.train_step(data.train)
        timers("step").stop()
        if nan_injection is not None:
            nan_injection.iteration = None
        watchdog.beat()
        _record_step(state, result, run)
        if state.iteration % logging.log_interval == 0:
            _check_skips(state, run)
            log_interval()
        stop = exits.should_exit(state.iteration)
        timed = checkpoint.save is not None and timed_saves.due()
        if checkpoint.save and (state.iteration % checkpoint.save_interval == 0 or stop or timed):
            _check_skips(state, run)
            pause_start = time.perf_counter()
            with watchdog.writing(checkpoint.save):
                save_checkpoint(run, backend, state.iteration, state.consumed_samples, saver)
                if stop:
                    wait_for_checkpoint(saver)
            log.plot()
            state.saved_iteration = state.iteration
            timed_saves.saved()
            paused += time.perf_counter() - pause_start
        if stop:
            if state.interval_iterations:  # the steps since the last log line: their line first
                log_interval()
            print_rank_0(f" exiting at iteration {state.iteration} ({exits.reason})"
                         + (", checkpoint saved" if checkpoint.save else ""))
            state.stopped_early = True
            break
        if data.do_valid and state.iteration % training.eval_interval == 0:
            pause_start = time.perf_counter()
            evaluate_and_print_results(f"iteration {state.iteration}", backend, data.valid, run, log,
                                       state.iteration, watchdog.beat)
            watchdog.beat()
            paused += time.perf_counter() - pause_start
    if not state.stopped_early:
        _check_skips(state, run)  # before the final checkpoint
    if state.interval_iterations:  # the last steps since a log line: their line (and the summary's train loss)
        log_interval()
    return state


def global_batch_note(state: TrainState, run: RunConfig) -> str | None:
    """The start-up note when a resumed run's global batch differs from the checkpoint's (allowed:
    the data continues at the consumed-sample count, the schedule by iteration)."""
    # A checkpoint without the count (0 at iteration > 0: written before it was kept) is not checked.
    if not (state.iteration and state.consumed_samples) or \
            state.consumed_samples == state.iteration * run.global_batch_size:
        return None
    training = run.training
    accumulation = training.gradient_accumulation_steps
    shape = f"--batch-size {training.micro_batch_size} x data parallel {run.parallel.data_parallel_size}" + \
        (f" x accumulation {accumulation}" if accumulation > 1 else "")
    return (f" note: the checkpoint consumed {state.consumed_samples} samples in {state.iteration} iterations "
            f"(global batch {state.consumed_samples / state.iteration:g}); this run's global batch is "
            f"{run.global_batch_size} ({shape}): the data continues at sample {state.consumed_samples}, the "
            f"learning-rate schedule at iteration {state.iteration}")


def pretrain(run: RunConfig, model_provider: ModelProvider, data_provider: DataProvider,
             forward_step: ForwardStep, pipeline_batch: PipelineBatchFn | None = None) -> TrainState:
    """Start-up, training, checkpoints and evaluation; every rank calls it.

    ``model_provider(run)`` builds the model (a ``PipelineDescription`` when pipelined, whose
    micro batches ``pipeline_batch`` makes); ``data_provider(run, position)`` returns the
    data iterators; ``forward_step(data_iterator, model, run)`` the loss of one micro batch.
    On a CPU run, freed host memory stays in the process for the next step (host_memory) unless
    ``--release-host-memory``.
    """
    if run.training.keep_host_memory and run.device.type == "cpu":
        keep_freed_host_memory()
    initialize_megatron(run.parallel, run.training.seed)
    lock = open_save_directory(run)  # one writer per --save, for the whole run
    try:
        return _pretrain(run, model_provider, data_provider, forward_step, pipeline_batch)
    finally:
        if lock is not None:
            lock.release()


def restart_note(parallel: ParallelConfig, saved_world_size: int | None, iteration: int,
                 restarts: tuple[int, int] = (0, 0)) -> str | None:
    """Why this group was started again and where it resumed (None on a plain start).

    ``restarts`` are the fewest and most restarts the ranks' agents counted. A node joined when
    the group is larger than the checkpoint's writer or when the counts differ (the new node's
    agent has counted none: an elastic torchrun restarts the group for a joining node without
    counting a restart); otherwise a count means a failure; a smaller group without one was
    relaunched at that size.
    """
    world = parallel.world_size
    written = "" if saved_world_size in (None, world) else f" from a checkpoint written by {saved_world_size} ranks"
    fewest, most = restarts
    if (saved_world_size is not None and saved_world_size < world) or fewest != most:
        return (f" > the group grew to {world} ranks: a node joined, and an elastic torchrun restarts the group for "
                f"it without counting a restart; resumed at iteration {iteration}{written}")
    if parallel.restart_count:
        return (f" > restart {parallel.restart_count} of at most {parallel.max_restarts} (torchrun): a rank or node "
                f"of the previous attempt failed or stopped making progress (its last lines say which); resumed at "
                f"iteration {iteration} on {world} ranks{written}")
    if written:
        return f" > the group changed size: resumed at iteration {iteration} on {world} ranks{written}"
    return None


def _saved_world_size(run: RunConfig, backend: Backend, iteration: int) -> int | None:
    """How many ranks wrote the checkpoint this run resumed from (None: none, or not recorded)."""
    if not run.checkpoint.load or iteration == 0:
        return None
    saved = saved_topology(os.path.join(run.checkpoint.load, checkpoint_tag(iteration)), Topology.of(run, backend.name))
    return None if saved is None else saved.data_parallel_size * saved.model_parallel_size * saved.pipe_parallel_size


def _pretrain(run: RunConfig, model_provider: ModelProvider, data_provider: DataProvider,
              forward_step: ForwardStep, pipeline_batch: PipelineBatchFn | None) -> TrainState:
    log = run_log(run, record_experiment(run))
    try:
        return _train_and_summarise(run, model_provider, data_provider, forward_step, pipeline_batch, log)
    finally:
        log.close()


def run_log(run: RunConfig, exp_dir: str | None) -> RunLog:
    """This rank's ``RunLog``: on rank 0 TensorBoard events in ``--tensorboard-dir``, else in
    ``exp_dir/tb`` (none with ``--no-tensorboard``), and ``loss.png`` in ``exp_dir``."""
    logging = run.logging
    tensorboard_dir = None
    if run.parallel.rank == 0 and logging.tensorboard:
        tensorboard_dir = logging.tensorboard_dir or (os.path.join(exp_dir, "tb") if exp_dir else None)
    wandb = None
    if run.parallel.rank == 0 and logging.wandb_project:
        wandb = WandbSettings(logging.wandb_project, logging.wandb_dir, logging.wandb_run_name, hparams(run))
    return RunLog(exp_dir if run.parallel.rank == 0 else None, tensorboard_dir,
                  run.global_batch_size * run.data.seq_length, wandb)


def _train_and_summarise(run: RunConfig, model_provider: ModelProvider, data_provider: DataProvider,
                         forward_step: ForwardStep, pipeline_batch: PipelineBatchFn | None, log: RunLog) -> TrainState:
    nan_injection = NanInjection.from_environment(forward_step)
    backend = build_backend(model_provider(run), run, nan_injection or forward_step, pipeline_batch)
    state, rng_states = TrainState(), None
    if run.checkpoint.load:
        state.iteration, state.consumed_samples, rng_states = load_checkpoint(run, backend)
        note = global_batch_note(state, run)
        if note:
            print_rank_0(note)
    parallel = run.parallel
    restarts = restart_counts(parallel)
    for note in (restart_note(parallel, _saved_world_size(run, backend, state.iteration), state.iteration, restarts),
                 shared_rendezvous_store_note()):
        if note:
            print_rank_0(note)
    print_rank_0(f" > training with {parallel.world_size} ranks: model parallel {parallel.model_parallel_size}, "
                 f"data parallel {parallel.data_parallel_size}, global batch {run.global_batch_size}, "
                 f"backend {backend.name}")
    data = data_provider(run, DataPosition(state.iteration, state.consumed_samples))
    if rng_states is not None:
        # Start-up (data loaders, DeepSpeed's pipeline engine) may draw from the generators:
        # restore the saved streams last, so the next step draws what it drew in the saved run.
        set_rng_states(rng_states, backend.rng_tracker)
    if state.iteration >= run.training.train_iters:
        print_rank_0(f" note: the checkpoint is at iteration {state.iteration} and --train-iters is "
                     f"{run.training.train_iters}: nothing to train (raise --train-iters to continue)")
        _final_evaluations(backend, data, run, state, None)
        return state
    watchdog = progress_watchdog(run)  # through the final save and evaluations too
    save = run.checkpoint.save
    saver = BackgroundSaver() if save and run.checkpoint.async_save else None
    first_iteration, started = state.iteration, time.perf_counter()
    try:
        state = train(backend, data, run, state, nan_injection, watchdog, saver, log)
        losses: tuple[float | None, float | None] = (None, None)
        if not state.stopped_early:
            if save:
                with watchdog.writing(save):
                    if state.saved_iteration != state.iteration:  # not saved by an interval
                        save_checkpoint(run, backend, state.iteration, state.consumed_samples, saver)
                        state.saved_iteration = state.iteration
                    wait_for_checkpoint(saver)
            losses = _final_evaluations(backend, data, run, state, watchdog, log)
        seconds = time.perf_counter() - started
        log.plot()
        checkpoint = os.path.join(save, checkpoint_tag(state.saved_iteration)) if state.saved_iteration else None
        outcome = Outcome(first_iteration, state.iteration, state.consumed_samples, seconds, state.last_loss,
                          *losses, checkpoint, state.last_loss_iteration, state.last_loss_skipped)
        for line in summary_lines(run, outcome, log) if run.parallel.rank == 0 else []:
            print(line, flush=True)
    except BaseException:
        if saver is not None and saver.busy:
            with watchdog.writing(save):
                settle_checkpoint(saver)
        raise
    finally:
        watchdog.stop()
    return state


def wait_for_checkpoint(saver: BackgroundSaver | None) -> None:
    """Block until the checkpoint completing in the background (if any) is complete; its failure
    (``TrainingAborted``) is raised here."""
    if saver is not None:
        saver.wait()


def settle_checkpoint(saver: BackgroundSaver | None) -> None:
    """On the way out after an error: let the checkpoint in flight complete (it holds good
    weights), and if it fails too, say so without hiding the first error."""
    try:
        wait_for_checkpoint(saver)
    except Exception as error:  # noqa: BLE001 - the error being raised is the one to report
        print_rank_0(f" note: the checkpoint being completed in the background failed too: {error}")


def progress_watchdog(run: RunConfig) -> ProgressWatchdog:
    """A started progress watchdog (``--progress-timeout-minutes``) for this rank."""
    watchdog = ProgressWatchdog(run.training.progress_timeout_minutes * 60, run.parallel.rank)
    watchdog.start()
    return watchdog


def _final_evaluations(backend: Backend, data: DataIterators, run: RunConfig, state: TrainState,
                       watchdog: ProgressWatchdog | None, log: RunLog | None = None) -> tuple[float | None, float | None]:
    """(validation, test) loss at the end of training (None where there is no such data)."""
    beat = watchdog.beat if watchdog is not None else None
    valid = test = None
    if data.do_valid:
        valid = evaluate_and_print_results(f"the end of training for val data | iteration {state.iteration}",
                                           backend, data.valid, run, log, state.iteration, progress=beat)
    if data.do_test:
        test = evaluate_and_print_results("the end of training for test data", backend, data.test, run,
                                          progress=beat)
    return valid, test
