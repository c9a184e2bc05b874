"""What a run leaves besides its checkpoints, on rank 0: TensorBoard events (in the experiment
directory's ``tb/`` unless ``--tensorboard-dir`` or ``--no-tensorboard``), the loss curve as
``loss.png`` (written at every checkpoint and at the end), and the closing summary with the
commands that use the checkpoint.

``RunLog`` takes scalars the way a TensorBoard ``SummaryWriter`` does (``add_scalar``, ``flush``,
``close``), so the loop hands it wherever it handed the writer.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Any

from megatron.config import RunConfig

TRAIN_LOSS, VALID_LOSS, LEARNING_RATE = "lm loss", "validation loss", "learning rate"


@dataclass(frozen=True)
class WandbSettings:
    """``--wandb-project``, ``--wandb-dir``, ``--wandb-run-name`` (the names Megatron-DeepSpeed and
    GPT-NeoX use) and the run's hyper-parameters for the W&B run's config."""

    project: str
    directory: str | None
    run_name: str | None
    config: dict[str, Any]

    def start(self, exp_dir: str | None) -> Any:
        """A W&B run logging into ``directory`` (default the experiment directory)."""
        import wandb

        directory = self.directory or exp_dir
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
        return wandb.init(project=self.project, dir=directory, name=self.run_name, config=self.config)


@dataclass
class Curves:
    """This run's points: (iteration, value) per scalar the plot and the summary need."""

    train: list[tuple[int, float]] = field(default_factory=list)
    valid: list[tuple[int, float]] = field(default_factory=list)
    learning_rate: list[tuple[int, float]] = field(default_factory=list)

    def add(self, name: str, value: float, iteration: int) -> None:
        series = {TRAIN_LOSS: self.train, VALID_LOSS: self.valid, LEARNING_RATE: self.learning_rate}.get(name)
        if series is not None:
            series.append((iteration, float(value)))


class RunLog:
    """Rank 0's TensorBoard events and curves (other ranks make one with nothing to write)."""

    def __init__(self, exp_dir: str | None, tensorboard_dir: str | None, tokens_per_iteration: int,
                 wandb: WandbSettings | None = None) -> None:
        self.exp_dir, self.tensorboard_dir = exp_dir, tensorboard_dir
        self.tokens_per_iteration = tokens_per_iteration
        self.curves = Curves()
        self._writer: Any = None
        self._wandb: Any = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=tensorboard_dir)
        if wandb is not None:
            self._wandb = wandb.start(exp_dir)

    def add_scalar(self, name: str, value: float, iteration: int) -> None:
        self.curves.add(name, value, iteration)
        if self._writer is not None:
            self._writer.add_scalar(name, value, iteration)
        if self._wandb is not None:
            self._wandb.log({name: value}, step=iteration)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    @property
    def plot_path(self) -> str | None:
        return None if self.exp_dir is None else os.path.join(self.exp_dir, "loss.png")

    def plot(self) -> None:
        """Write ``loss.png`` (replaced atomically) when there is a curve to draw."""
        if self.plot_path is not None and self.curves.train:
            plot_curves(self.curves, self.tokens_per_iteration, self.plot_path)


def plot_curves(curves: Curves, tokens_per_iteration: int, path: str) -> None:
    """Train and validation loss against tokens, the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    def tokens(points: list[tuple[int, float]]) -> list[int]:
        return [iteration * tokens_per_iteration for iteration, _ in points]

    figure, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    loss_axis.plot(tokens(curves.train), [v for _, v in curves.train], label="train loss", color="tab:blue")
    if curves.valid:
        loss_axis.plot(tokens(curves.valid), [v for _, v in curves.valid], "o-", label="validation loss",
                       color="tab:orange")
    loss_axis.set_xlabel("tokens (iterations x global batch x sequence length)")
    loss_axis.set_ylabel("lm loss")
    loss_axis.grid(alpha=0.3)
    handles, labels = loss_axis.get_legend_handles_labels()
    if curves.learning_rate:
        rate_axis = loss_axis.twinx()
        rate_axis.plot(tokens(curves.learning_rate), [v for _, v in curves.learning_rate], "--",
                       label="learning rate", color="tab:gray")
        rate_axis.set_ylabel("learning rate")
        more_handles, more_labels = rate_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    loss_axis.legend(handles, labels, loc="upper right")
    figure.tight_layout()
    partial = f"{path}.tmp{os.getpid()}.png"
    figure.savefig(partial)
    plt.close(figure)
    os.replace(partial, path)


@dataclass(frozen=True)
class Outcome:
    """What the summary reports of a finished run."""

    first_iteration: int  # the iteration this run started from (0, or the checkpoint's)
    iteration: int
    consumed_samples: int
    seconds: float
    train_loss: float | None
    valid_loss: float | None
    test_loss: float | None
    checkpoint: str | None  # the newest checkpoint directory this run wrote
    train_loss_iteration: int | None = None  # the iteration whose log line gave ``train_loss``
    train_loss_skipped: int = 0  # the skipped steps of that line's interval


def next_commands(run: RunConfig) -> dict[str, str]:
    """The commands that use a GPT-2 run's checkpoints (single process; any model-parallel size)."""
    save, data = run.checkpoint.save, run.data
    tokenizer = f"--vocab-file {shlex.quote(data.vocab_file)} --merge-file {shlex.quote(data.merge_file)}"
    load = f"--load {shlex.quote(save)}"
    export = shlex.quote(os.path.normpath(save) + "-hf")  # beside the run's directory, never inside it
    text = evaluation_text(run)
    return {
        # sampled as the demo samples are: greedy decoding loops on a small model
        "generate": f"python generate_samples.py {load} {tokenizer} --num-samples 2 --top_k 40 --temperature 0.8 "
                    f"--seed 1234 --out-seq-length {min(64, data.seq_length)}",
        "evaluate": f"python evaluate_gpt2.py {load} {tokenizer} --valid-data {shlex.quote(text or 'TEXT_FILE')} "
                    f"--overlapping-eval {data.seq_length}" + ("" if text else " --no-detokenize"),
        "export": f"python tools/convert_checkpoint.py to-hf {load} --output {export} {tokenizer}",
    }


def evaluation_text(run: RunConfig) -> str | None:
    """A loose-JSON file of this run's data for ``evaluate_gpt2.py`` (its validation data, else
    its training corpus), or None when it trained from ``--data-path`` (pre-tokenized data)."""
    from megatron.data.builder import resolve_corpus

    for names in (run.data.valid_data, run.data.train_data):
        if names:
            path = resolve_corpus(names[0], run.data)
            return path if os.path.isfile(path) else None
    return None


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _train_loss_note(outcome: Outcome) -> str:
    """Says so when skipped steps shape the train loss: it is an earlier log line's (every later
    step was skipped), or the mean of fewer steps than its interval had."""
    at, skipped = outcome.train_loss_iteration, outcome.train_loss_skipped
    if outcome.train_loss is None or at is None:
        return ""
    whose = f", whose interval skipped {skipped} step(s)" if skipped else ""
    if at != outcome.iteration:
        return f" (from the log line at iteration {at}{whose}: every later step was skipped)"
    if skipped:
        return f" (the last log interval skipped {skipped} step(s): the mean of its other steps)"
    return ""


def summary_lines(run: RunConfig, outcome: Outcome, log: RunLog) -> list[str]:
    """Rank 0's closing lines: what was trained, how it ended, where everything is, what next."""
    trained = outcome.iteration - outcome.first_iteration
    tokens = trained * run.global_batch_size * run.data.seq_length
    resumed = (f" (resumed at iteration {outcome.first_iteration}, now at {outcome.iteration})"
               if outcome.first_iteration else "")
    lines = [f" training summary: {trained} iterations{resumed}, {tokens:,} tokens in {outcome.seconds:.0f} s",
             f"   final lm loss: train {_loss(outcome.train_loss)}{_train_loss_note(outcome)} | "
             f"validation {_loss(outcome.valid_loss)} | "
             f"test {_loss(outcome.test_loss)}"]
    if outcome.checkpoint is not None:
        lines.append(f"   checkpoint:  {outcome.checkpoint}")
    if log.exp_dir is not None:
        plot = " and loss.png" if log.plot_path is not None and os.path.isfile(log.plot_path) else ""
        lines.append(f"   experiment:  {log.exp_dir} (hparams.json, run_config.json, git hash and diff{plot})")
    if log.tensorboard_dir is not None:
        lines.append(f"   TensorBoard: tensorboard --logdir {shlex.quote(log.tensorboard_dir)}")
    if outcome.checkpoint is not None and run.data.tokenizer_type == "GPT2BPETokenizer":  # not BERT
        lines.append("   next:")
        lines += [f"     {name + ':':10s}{command}" for name, command in next_commands(run).items()]
    return lines
