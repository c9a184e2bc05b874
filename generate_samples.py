"""Sample text from a trained GPT-2: from a prompt file, unconditionally, or interactively.

    torchrun --nproc_per_node 2 generate_samples.py --load CKPT --model-parallel-size 2 \
        --vocab-file V --merge-file M --sample-input-file prompts.txt --sample-output-file out.jsonl

The checkpoint may be Megatron or DeepSpeed, saved at any model-parallel size. With
``--sample-input-file`` (one prompt a line) each prompt gives one JSON line
``{"prompt": ..., "text": ...}`` (``text`` is the continuation only) in ``--sample-output-file``
(or on stdout), in input order; ``--num-samples N`` without an input file writes N unconditional
samples (prompt ""); with neither, prompts are read from stdin until EOF, one at a time. Prompts
from a file or ``--num-samples`` are decoded ``--batch-size`` at a time. ``--out-seq-length``
caps prompt plus continuation; ``--greedy`` takes the argmax, otherwise ``--temperature``,
``--top_k`` or ``--top_p`` shape the draw. Each prompt samples from its own generator, seeded
from ``--seed`` and its index in the input: the same seed gives the same text at any batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from itertools import islice
from typing import TextIO

import torch.distributed as dist

from megatron.errors import ConfigError
from megatron.inference import (
    InferenceModel,
    SamplingSettings,
    StoppingRule,
    add_inference_args,
    generate,
    inference_config,
    load_inference_model,
    prompt_generator,
)
from megatron.inference.outputs import check_output_file
from megatron.training.entry import run_entry_point


def build_parser() -> argparse.ArgumentParser:
    from arguments import build_parser as build_training_parser

    parser = add_inference_args(build_training_parser())
    parser.description = "GPT-2 text generation"
    group = parser.add_argument_group("samples", "where prompts come from and samples go")
    group.add_argument("--sample-input-file", default=None, help="prompts, one a line")
    group.add_argument("--sample-output-file", default=None, help="JSON lines output (default: stdout)")
    group.add_argument("--num-samples", type=int, default=0,
                       help="unconditional samples to draw when there is no --sample-input-file")
    return parser


def validate_sample_args(args: argparse.Namespace) -> SamplingSettings:
    """The sampling settings; ConfigError for any bad sampling flag, a missing prompt file or an
    output file that cannot be written (checked before anything is loaded)."""
    settings = SamplingSettings(args.greedy, args.temperature, args.top_k, args.top_p)
    settings.validate()
    if args.out_seq_length <= 0:
        raise ConfigError(f"--out-seq-length must be positive, got {args.out_seq_length}")
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size} (prompts decoded together)")
    if args.num_samples < 0:
        raise ConfigError(f"--num-samples must be >= 0, got {args.num_samples}")
    if args.sample_input_file and os.path.isdir(args.sample_input_file):
        raise ConfigError(f"--sample-input-file {args.sample_input_file!r} is a directory; pass a text file "
                          "of prompts, one a line")
    if args.sample_input_file and not os.path.isfile(args.sample_input_file):
        raise ConfigError(f"--sample-input-file {args.sample_input_file!r} does not exist")
    if args.sample_output_file:
        check_output_file("--sample-output-file", args.sample_output_file)
    return settings


def _is_writer() -> bool:
    return dist.get_rank() == 0


def _interactive_prompts() -> Iterator[str]:
    """Lines typed on rank 0's stdin, broadcast to every rank; ends at EOF."""
    while True:
        box = [None]
        if _is_writer():
            print("Model prompt >>> ", end="", flush=True)
            line = sys.stdin.readline()
            box = [line.rstrip("\n") if line else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        yield box[0]


def _file_prompts(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        try:
            yield from (line.rstrip("\n") for line in handle)
        except UnicodeDecodeError as error:
            raise ConfigError(f"--sample-input-file {path} is not UTF-8 text ({error.reason}); "
                              "convert it to UTF-8") from None


def prompts(args: argparse.Namespace) -> Iterator[str]:
    if args.sample_input_file:
        yield from _file_prompts(args.sample_input_file)
    elif args.num_samples:
        yield from ("" for _ in range(args.num_samples))
    else:
        yield from _interactive_prompts()


def prompt_batches(args: argparse.Namespace) -> Iterator[list[str]]:
    """``--batch-size`` prompts at a time from a file or ``--num-samples``; typed ones singly
    (the next prompt is not typed before this one's answer)."""
    size = args.batch_size if args.sample_input_file or args.num_samples else 1
    source = prompts(args)
    while batch := list(islice(source, size)):
        yield batch


def _write_batch(loaded: InferenceModel, batch: list[str], first_index: int, settings: SamplingSettings,
                 args: argparse.Namespace, output: TextIO | None) -> None:
    """Generate for ``batch`` (prompts ``first_index ..`` of the input); rank 0 writes the lines."""
    tokenizer = loaded.tokenizer
    contexts = [tokenizer.tokenize(prompt) if prompt else [tokenizer.eod] for prompt in batch]
    generators = [prompt_generator(args.seed, first_index + i) for i in range(len(batch))]
    stopping = StoppingRule(eod=tokenizer.eod, max_length=args.out_seq_length)
    continuations = generate(loaded.model, contexts, settings, stopping, loaded.config.vocab_size, generators)
    if output is not None:
        for prompt, tokens in zip(batch, continuations):
            output.write(json.dumps({"prompt": prompt, "text": tokenizer.detokenize(tokens)}) + "\n")
        output.flush()


def run(args: argparse.Namespace) -> None:
    settings = validate_sample_args(args)
    loaded = load_inference_model(inference_config(args))
    output: TextIO | None = None
    if _is_writer():
        output = open(args.sample_output_file, "w", encoding="utf-8") if args.sample_output_file else sys.stdout
    try:
        done = 0
        for batch in prompt_batches(args):
            _write_batch(loaded, batch, done, settings, args, output)
            done += len(batch)
    finally:
        if output is not None and output is not sys.stdout:
            output.close()


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 done, 2 bad input (one ``error:`` line), 1 a collective failed."""
    return run_entry_point(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
