"""Convert GPT-2 checkpoints: to and from Hugging Face, and between model-parallel sizes.

    python tools/convert_checkpoint.py to-hf --load CKPT --output HF_DIR [--vocab-file V --merge-file M]
    python tools/convert_checkpoint.py from-hf --input HF_DIR --save CKPT --model-parallel-size 2
    python tools/convert_checkpoint.py reshard --load CKPT --save CKPT2 --model-parallel-size 4

``to-hf`` reads a Megatron or DeepSpeed checkpoint (any model-parallel size, any ZeRO stage) and
writes ``config.json`` + ``model.safetensors`` for ``GPT2LMHeadModel``. ``from-hf`` writes an
iteration-0 Megatron checkpoint (weights only) that ``pretrain_gpt2.py --load`` continues from.
``reshard`` rewrites a checkpoint at another model-parallel size, optimizer state included
(Megatron-path checkpoints; a DeepSpeed one yields weights and progress without optimizer state).
See docs/using_checkpoints.md. DeepSpeed files are unpickled (``weights_only=False``): trusted only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron.checkpoint.convert import (  # noqa: E402
    Checkpoint,
    read_checkpoint,
    repad_checkpoint,
    write_megatron_checkpoint,
)
from megatron.checkpoint.layout import TRACKER_FILENAME, check_tokenizer, complete_iterations  # noqa: E402
from megatron.checkpoint.lock import DirectoryLock  # noqa: E402
from megatron.errors import ConfigError  # noqa: E402
from megatron.model.hf_gpt2 import from_hf_state_dict, to_hf_state_dict  # noqa: E402
from megatron.mpu import pad_vocab_size  # noqa: E402
from megatron.tokenizer import build_tokenizer, tokenizer_identity  # noqa: E402
from megatron.training.entry import run_entry_point  # noqa: E402

HF_WEIGHTS = "model.safetensors"
HF_CONFIG_KEYS = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("to-hf", help="Megatron/DeepSpeed checkpoint -> Hugging Face GPT2LMHeadModel")
    to_hf.add_argument("--load", required=True, help="checkpoint directory (with latest_checkpointed_iteration.txt)")
    to_hf.add_argument("--output", required=True, help="Hugging Face model directory to create")
    from_hf = commands.add_parser("from-hf", help="Hugging Face GPT-2 directory -> Megatron checkpoint")
    from_hf.add_argument("--input", required=True, help="directory with config.json and model.safetensors")
    from_hf.add_argument("--save", required=True, help="checkpoint directory to create")
    reshard = commands.add_parser("reshard", help="Megatron checkpoint at size k -> size j")
    reshard.add_argument("--load", required=True)
    reshard.add_argument("--save", required=True)
    reshard.add_argument("--seed", type=int, default=1234,
                         help="seeds the per-rank attention-dropout RNG when the size changes (as a fresh run would)")
    for command in (from_hf, reshard):
        command.add_argument("--model-parallel-size", type=int, required=True)
        command.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                             help="as for pretrain_gpt2.py: the padded vocabulary must match the training run")
    for command in (to_hf, reshard):
        command.add_argument("--iteration", type=int, default=None, help="default: the latest complete one")
    for command in (to_hf, reshard):
        command.add_argument("--vocab-size", type=int, default=None,
                             help="true vocabulary size (default: from --vocab-file, else the padded size)")
        command.add_argument("--vocab-file", default=None, help="tokenizer vocab.json (copied by to-hf)")
        command.add_argument("--merge-file", default=None, help="tokenizer merges.txt (copied by to-hf)")
        command.add_argument("--override-tokenizer-check", action="store_true",
                             help="accept tokenizer files other than the ones the checkpoint was trained with")
    parser.set_defaults(tokenizer_type="GPT2BPETokenizer")  # GPT-2's BPE: --vocab-file + --merge-file
    return parser


def true_vocab_size(args: argparse.Namespace, checkpoint: Checkpoint) -> int:
    """--vocab-size, else the tokenizer's (which must be the checkpoint's), else the one the
    checkpoint recorded, else every row of the checkpoint (padding included)."""
    if args.vocab_size is not None:
        size = args.vocab_size
    elif args.vocab_file or args.merge_file:
        tokenizer = build_tokenizer(args)
        check_tokenizer(checkpoint.model_config, tokenizer_identity(args, tokenizer), args.load,
                        args.override_tokenizer_check)
        size = tokenizer.vocab_size
    elif "vocab_size" in checkpoint.model_config:
        size = checkpoint.model_config["vocab_size"]
    else:
        size = checkpoint.padded_vocab_size
        print(f" note: no --vocab-size or --vocab-file; keeping all {size} embedding rows", flush=True)
    if size > checkpoint.padded_vocab_size:
        raise ConfigError(f"vocabulary size {size} exceeds the checkpoint's embedding rows "
                          f"({checkpoint.padded_vocab_size}): wrong --vocab-size or tokenizer files")
    return size


def hf_config(model_config: dict[str, int], vocab_size: int, eod: int | None) -> dict:
    """``GPT2Config`` fields for our architecture (pre-LN, tanh GELU, LayerNorm eps 1e-5, tied head)."""
    eos = eod if eod is not None else vocab_size - 1
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
        "n_positions": model_config["max_position_embeddings"], "n_embd": model_config["hidden_size"],
        "n_layer": model_config["num_layers"], "n_head": model_config["num_attention_heads"],
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
        "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": True,
        "scale_attn_weights": True, "torch_dtype": "float32",
    }


def check_hf_output(output: str) -> None:
    """``--output`` is a new (or empty) directory: an export never overwrites files."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"--output {output} is a file; name a directory to create")
    taken = [name for name in (HF_WEIGHTS, "config.json") if os.path.exists(os.path.join(output, name))]
    if taken:
        raise ConfigError(f"--output {output} already holds {', '.join(taken)}: export into a new directory "
                          "(an export never overwrites a model)")


def open_output_run(save: str, load: str | None = None) -> DirectoryLock:
    """Lock ``--save`` for writing and make sure it holds no checkpoint: a tool never overwrites a
    run, nor the checkpoint it reads (paths are compared after resolving links)."""
    if load is not None and os.path.realpath(save) == os.path.realpath(load):
        raise ConfigError(f"--save {save} is --load {load}: write the converted checkpoint to a new directory")
    if os.path.exists(save) and not os.path.isdir(save):
        raise ConfigError(f"--save {save} is a file; name a directory to create")
    lock = DirectoryLock(save)
    note = lock.acquire("--save")
    if note:
        print(f" note: {note}", flush=True)
    existing = complete_iterations(save)
    if existing or os.path.exists(os.path.join(save, TRACKER_FILENAME)):
        lock.release()
        held = f"iterations {existing}" if existing else TRACKER_FILENAME
        raise ConfigError(f"--save {save} already holds a run's checkpoints ({held}): write the converted "
                          "checkpoint to a new directory (a tool never overwrites a run)")
    return lock


def to_hf(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    check_hf_output(args.output)
    checkpoint = read_checkpoint(args.load, args.iteration, with_optimizer=False)
    vocab_size = true_vocab_size(args, checkpoint)
    eod = build_tokenizer(args).eod if args.vocab_file and args.merge_file else checkpoint.model_config.get("eod_token")
    hf = to_hf_state_dict(checkpoint.model, vocab_size)
    hf.pop("lm_head.weight")  # tied to wte; safetensors stores a tensor once
    os.makedirs(args.output, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, os.path.join(args.output, HF_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(args.output, "config.json"), "w") as handle:
        json.dump(hf_config(checkpoint.model_config, vocab_size, eod), handle, indent=2)
    for source, name in ((args.vocab_file, "vocab.json"), (args.merge_file, "merges.txt")):
        if source:
            shutil.copyfile(source, os.path.join(args.output, name))
    print(f" wrote {args.output} ({checkpoint.kind} checkpoint at iteration {checkpoint.iteration}, "
          f"vocabulary {vocab_size})", flush=True)


def read_hf_model(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{directory!r} is not a Hugging Face model directory (no config.json)")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{config_path} is not valid JSON ({error}); re-export the model") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} must hold a JSON object (a GPT2Config)")
    if config.get("model_type") != "gpt2":
        raise ConfigError(f"{config_path} describes a {config.get('model_type')!r} model; only gpt2 converts")
    missing = [key for key in HF_CONFIG_KEYS if not isinstance(config.get(key), int) or config[key] <= 0]
    if missing:
        raise ConfigError(f"{config_path} lacks positive integers for {', '.join(missing)} (a GPT2Config has them); "
                          "re-export the model")
    for key, expected in (("activation_function", "gelu_new"), ("n_inner", None)):
        if config.get(key, expected) != expected:
            raise ConfigError(f"{config_path}: {key}={config[key]!r} is not supported (needs {expected!r})")
    safetensors_path, bin_path = os.path.join(directory, HF_WEIGHTS), os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file

        return config, load_file(safetensors_path)
    if os.path.isfile(bin_path):
        return config, torch.load(bin_path, map_location="cpu", weights_only=True)
    raise ConfigError(f"{directory!r} has no {HF_WEIGHTS} or pytorch_model.bin")


def from_hf(args: argparse.Namespace) -> None:
    lock = open_output_run(args.save)
    config, hf = read_hf_model(args.input)
    mp_size = args.model_parallel_size
    if config["n_head"] % mp_size:
        raise ConfigError(f"the model's {config['n_head']} heads are not divisible by --model-parallel-size {mp_size}")
    padded = pad_vocab_size(config["vocab_size"], args.make_vocab_size_divisible_by, mp_size)
    model_config = {"num_layers": config["n_layer"], "hidden_size": config["n_embd"],
                    "num_attention_heads": config["n_head"], "max_position_embeddings": config["n_positions"],
                    "padded_vocab_size": padded, "model_parallel_size": mp_size}
    serial = {k: v.float() for k, v in from_hf_state_dict(hf, padded).items()}
    checkpoint = Checkpoint(model=serial, model_config=model_config, iteration=0, consumed_samples=0, kind="hf")
    directory = write_megatron_checkpoint(checkpoint, args.save, mp_size)
    lock.release()
    print(f" wrote {directory} (iteration 0, model-parallel size {mp_size}, padded vocabulary {padded})", flush=True)


def reshard(args: argparse.Namespace) -> None:
    lock = open_output_run(args.save, args.load)
    checkpoint = read_checkpoint(args.load, args.iteration)
    for note in checkpoint.notes:
        print(f" note: {note}", flush=True)
    vocab_size = true_vocab_size(args, checkpoint)
    padded = pad_vocab_size(vocab_size, args.make_vocab_size_divisible_by, args.model_parallel_size)
    repad_checkpoint(checkpoint, padded, vocab_size)
    heads = checkpoint.model_config["num_attention_heads"]
    if heads % args.model_parallel_size:
        raise ConfigError(f"the model's {heads} heads are not divisible by --model-parallel-size "
                          f"{args.model_parallel_size}")
    directory = write_megatron_checkpoint(checkpoint, args.save, args.model_parallel_size, args.seed)
    lock.release()
    print(f" wrote {directory} (model-parallel size {args.model_parallel_size}, padded vocabulary {padded})",
          flush=True)


def run(args: argparse.Namespace) -> None:
    if getattr(args, "model_parallel_size", 1) <= 0:
        raise ConfigError(f"--model-parallel-size must be positive, got {args.model_parallel_size}")
    {"to-hf": to_hf, "from-hf": from_hf, "reshard": reshard}[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """0 done; 2 and one ``error:`` line for a user mistake; 1 and one line when a write failed."""
    args = build_parser().parse_args(argv)
    return run_entry_point(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
