"""Sample text from a trained GPT-2: from a prompt file, unconditionally, or interactively.

    torchrun --nproc_per_node 2 generate_samples.py --load CKPT --model-parallel-size 2 \
        --vocab-file V --merge-file M --sample-input-file prompts.txt --sample-output-file out.jsonl

The checkpoint may be Megatron or DeepSpeed, saved at any model-parallel size. With
``--sample-input-file`` (one prompt a line) each prompt gives one JSON line
``{"prompt": ..., "text": ...}`` (``text`` is the continuation only) in ``--sample-output-file``
(or on stdout); ``--num-samples N`` without an input file writes N unconditional samples (prompt
""); with neither, prompts are read from stdin until EOF. ``--out-seq-length`` caps prompt plus
continuation; ``--greedy`` takes the argmax, otherwise ``--temperature``, ``--top_k`` or
``--top_p`` shape the draw. The same ``--seed`` gives the same text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import TextIO

import torch
import torch.distributed as dist

from megatron.errors import ConfigError
from megatron.text_generation import (
    SamplingSettings,
    add_inference_args,
    generate,
    load_inference_model,
)
from megatron.training import run_entry_point


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
    settings = SamplingSettings(args.greedy, args.temperature, args.top_k, args.top_p)
    settings.validate()
    if args.out_seq_length <= 0:
        raise ConfigError(f"--out-seq-length must be positive, got {args.out_seq_length}")
    if args.num_samples < 0:
        raise ConfigError(f"--num-samples must be >= 0, got {args.num_samples}")
    if args.sample_input_file and not os.path.isfile(args.sample_input_file):
        raise ConfigError(f"--sample-input-file {args.sample_input_file!r} does not exist")
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


def prompts(args: argparse.Namespace) -> Iterator[str]:
    if args.sample_input_file:
        with open(args.sample_input_file, encoding="utf-8") as handle:
            yield from (line.rstrip("\n") for line in handle)
    elif args.num_samples:
        yield from ("" for _ in range(args.num_samples))
    else:
        yield from _interactive_prompts()


def run(args: argparse.Namespace) -> None:
    settings = validate_sample_args(args)
    model, tokenizer = load_inference_model(args)
    generator = torch.Generator().manual_seed(args.seed)
    output: TextIO | None = None
    if _is_writer():
        output = open(args.sample_output_file, "w", encoding="utf-8") if args.sample_output_file else sys.stdout
    try:
        for prompt in prompts(args):
            context = tokenizer.tokenize(prompt) if prompt else [tokenizer.eod]
            tokens = generate(model, context, args.out_seq_length, settings, tokenizer.eod,
                              args.vocab_size, generator)
            if output is not None:
                output.write(json.dumps({"prompt": prompt, "text": tokenizer.detokenize(tokens)}) + "\n")
                output.flush()
    finally:
        if output is not None and output is not sys.stdout:
            output.close()


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 done, 2 bad input (one ``error:`` line), 1 a collective failed."""
    return run_entry_point(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
