"""Greedy generation speed: this project's batched KV-cache decoding against transformers' ``generate``.

    python tools/bench_generation.py                         # demo-sized model, vocab 8000, batch 1 and 8
    python tools/bench_generation.py --vocab-size 50257 --rounds 5 --threads 2

Both contenders run in this process on the same weights: a random ``GPT2Model`` (model-parallel
size 1) exported with ``megatron.model.hf_gpt2.to_hf_state_dict`` into ``GPT2LMHeadModel``.
Both get the same prompts (token ids of varied lengths, fixed seed, left-padded in a batch), the
same number of new tokens per prompt (end-of-document stopping off on both sides), the same torch
threads, and ``torch.inference_mode``.

* ``megatron``: ``megatron.inference.generate``, the code ``generate_samples.py`` runs, with
  ``StoppingRule(stop_at_eod=False, max_new_tokens=N)``.
* ``transformers``: ``GPT2LMHeadModel.generate(do_sample=False, use_cache=True, max_new_tokens=N,
  min_new_tokens=N)`` with its default (dynamic) KV cache and SDPA attention, no eos token.

Batch size 1 decodes the prompts one at a time; batch size B decodes them B at a time. The two
contenders alternate order each round; the table reports the median tokens/s over the rounds
(new tokens over wall time, prompt processing included) and their ratio, and whether both chose
the same greedy tokens. Prints a Markdown table and writes ``bench_out/bench_generation.json``.
A benchmark: it never fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron import mpu  # noqa: E402
from megatron.inference import SamplingSettings, StoppingRule, generate  # noqa: E402
from megatron.model import GPT2Model  # noqa: E402
from megatron.model.hf_gpt2 import to_hf_state_dict  # noqa: E402

Prompts = list[list[int]]
Generator = Callable[[Prompts], Prompts]  # prompts of one batch -> their new tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--max-position-embeddings", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=8000,
                        help="8000: the demo tokenizer's; 50257: GPT-2's")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="our embedding is padded as in training; transformers gets the true vocabulary")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--min-prompt-length", type=int, default=4)
    parser.add_argument("--max-prompt-length", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per prompt, forced on both sides")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, contenders alternating order")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both sides")
    parser.add_argument("--init-std", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output", default=os.path.join(REPO, "bench_out", "bench_generation.json"))
    args = parser.parse_args(argv)
    for flag, value in (("--num-prompts", args.num_prompts), ("--new-tokens", args.new_tokens),
                        ("--rounds", args.rounds), ("--threads", args.threads), ("--batch-sizes", min(args.batch_sizes))):
        if value < 1:
            raise SystemExit(f"{flag} must be at least 1, got {value}")
    if args.max_prompt_length + args.new_tokens > args.max_position_embeddings:
        raise SystemExit(f"--max-prompt-length ({args.max_prompt_length}) + --new-tokens ({args.new_tokens}) "
                         f"exceeds --max-position-embeddings ({args.max_position_embeddings}); lower one")
    if not 1 <= args.min_prompt_length <= args.max_prompt_length:
        raise SystemExit(f"need 1 <= --min-prompt-length ({args.min_prompt_length}) <= --max-prompt-length "
                         f"({args.max_prompt_length})")
    return args


def start_single_rank() -> None:
    """A one-rank gloo group and model-parallel size 1: what ``generate_samples.py`` runs under."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    mpu.initialize_model_parallel(1)
    mpu.model_parallel_cuda_manual_seed(0)


def build_models(args: argparse.Namespace) -> tuple[GPT2Model, torch.nn.Module]:
    """A random ``GPT2Model`` and ``GPT2LMHeadModel`` holding the same weights, both in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    padded_vocab = mpu.pad_vocab_size(args.vocab_size, args.make_vocab_size_divisible_by, 1)
    ours = GPT2Model(num_layers=args.num_layers, vocab_size=padded_vocab, hidden_size=args.hidden_size,
                     num_attention_heads=args.num_attention_heads, embedding_dropout_prob=0.0,
                     attention_dropout_prob=0.0, output_dropout_prob=0.0,
                     max_sequence_length=args.max_position_embeddings, checkpoint_activations=False,
                     parallel_output=True, init_method_std=args.init_std).eval()
    config = GPT2Config(vocab_size=args.vocab_size, n_positions=args.max_position_embeddings,
                        n_embd=args.hidden_size, n_layer=args.num_layers, n_head=args.num_attention_heads,
                        activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    theirs = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").eval()
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), args.vocab_size), strict=False)
    if unexpected or any(".attn.bias" not in k and "masked_bias" not in k for k in missing):
        raise SystemExit(f"weight export mismatch: missing {missing}, unexpected {unexpected}")
    return ours, theirs


def make_prompts(args: argparse.Namespace) -> Prompts:
    generator = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_prompt_length, args.max_prompt_length + 1, (args.num_prompts,),
                            generator=generator)
    return [torch.randint(1, args.vocab_size, (int(n),), generator=generator).tolist() for n in lengths]


def megatron_generator(model: GPT2Model, args: argparse.Namespace) -> Generator:
    stopping = StoppingRule(eod=0, max_length=args.max_position_embeddings, stop_at_eod=False,
                            max_new_tokens=args.new_tokens)
    greedy = SamplingSettings(greedy=True)

    def run(prompts: Prompts) -> Prompts:
        return generate(model, prompts, greedy, stopping, args.vocab_size)

    return run


def transformers_generator(model: torch.nn.Module, args: argparse.Namespace) -> Generator:
    def run(prompts: Prompts) -> Prompts:
        width = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)  # left padding, pad id 0
        attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        output = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, use_cache=True,
                                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                eos_token_id=None, pad_token_id=0)
        return output[:, width:].tolist()

    return run


def timed(run: Generator, prompts: Prompts, batch_size: int) -> tuple[float, Prompts]:
    """(new tokens per second, the new tokens) decoding ``prompts`` ``batch_size`` at a time."""
    outputs: Prompts = []
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(prompts), batch_size):
            outputs += run(prompts[first:first + batch_size])
    seconds = time.perf_counter() - start
    return sum(len(tokens) for tokens in outputs) / seconds, outputs


def measure(contenders: dict[str, Generator], prompts: Prompts, args: argparse.Namespace) -> dict:
    """Tokens/s of every contender at every batch size, ``args.rounds`` times, order alternating."""
    runs: dict[int, dict[str, list[float]]] = {b: {name: [] for name in contenders} for b in args.batch_sizes}
    tokens: dict[int, dict[str, Prompts]] = {b: {} for b in args.batch_sizes}
    for batch_size in args.batch_sizes:  # warm-up: first calls allocate and pick kernels
        for name, run in contenders.items():
            _, tokens[batch_size][name] = timed(run, prompts, batch_size)
    names = list(contenders)
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for batch_size in args.batch_sizes:
            for name in order:
                rate, _ = timed(contenders[name], prompts, batch_size)
                runs[batch_size][name].append(rate)
    results = {}
    for batch_size in args.batch_sizes:
        medians = {name: statistics.median(rates) for name, rates in runs[batch_size].items()}
        same = [a == b for a, b in zip(tokens[batch_size]["megatron"], tokens[batch_size]["transformers"])]
        results[batch_size] = {
            "tokens_per_s": medians, "runs": runs[batch_size],
            "ratio_megatron_to_transformers": medians["megatron"] / medians["transformers"],
            "prompts_with_identical_greedy_tokens": f"{sum(same)}/{len(same)}",
        }
    return results


def markdown(results: dict, setup: str) -> str:
    lines = [setup, "", "| batch | this project tokens/s | transformers tokens/s | ratio | identical greedy tokens |",
             "|---:|---:|---:|---:|---:|"]
    for batch_size, result in results.items():
        rates = result["tokens_per_s"]
        lines.append(f"| {batch_size} | {rates['megatron']:.0f} | {rates['transformers']:.0f} | "
                     f"{result['ratio_megatron_to_transformers']:.2f} | "
                     f"{result['prompts_with_identical_greedy_tokens']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start_single_rank()
    ours, theirs = build_models(args)
    prompts = make_prompts(args)
    contenders = {"megatron": megatron_generator(ours, args), "transformers": transformers_generator(theirs, args)}
    results = measure(contenders, prompts, args)
    import transformers

    setup = (f"GPT-2 {args.num_layers} layers, hidden {args.hidden_size}, {args.num_attention_heads} heads, "
             f"vocab {args.vocab_size}, {args.num_prompts} prompts of {args.min_prompt_length}-"
             f"{args.max_prompt_length} tokens, {args.new_tokens} new tokens each, greedy, fp32 CPU, "
             f"{args.threads} torch threads, median of {args.rounds} rounds; transformers "
             f"{transformers.__version__} GPT2LMHeadModel.generate (attn_implementation="
             f"{theirs.config._attn_implementation}, use_cache=True, torch.inference_mode), torch {torch.__version__}")
    print(markdown(results, setup), flush=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"setup": setup, "args": vars(args), "results": results}, handle, indent=2)
    print(f"wrote {args.output}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
