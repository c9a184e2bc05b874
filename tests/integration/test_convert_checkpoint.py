"""tools/convert_checkpoint.py on checkpoints written by real training runs (Megatron and DeepSpeed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import convert, random_hf_model
from distributed import run_distributed
from launchers import (
    DIVISIBLE,
    NO_DROPOUT,
    TINY_GPT2,
    TOKENIZER,
    assert_losses_close,
    assert_one_line_error,
    losses,
    run_training,
)

from megatron.checkpoint.convert import read_checkpoint

MP2 = ["--batch-size", "4", "--model-parallel-size", "2"]


def tensors_equal(a: object, b: object, path: str = "") -> None:
    """Nested dicts/lists of tensors and values are identical."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, a.keys() ^ b.keys())
        for key in a:
            tensors_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            tensors_equal(x, y, f"{path}[{index}]")
    else:
        assert a == b, (path, a, b)


@pytest.fixture(scope="module")
def megatron_run(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, str]]:
    """20 iterations at model-parallel size 2 (fp32, no dropout), checkpoints at 10 and 20."""
    save = tmp_path_factory.mktemp("megatron") / "ckpt"
    out = run_training(2, TINY_GPT2 + NO_DROPOUT + MP2 + ["--train-iters", "20", "--save", str(save),
                                                          "--save-interval", "10"])
    return save, losses(out.stdout)


def _file(root: Path, mp_rank: int, iteration: int = 10) -> dict:
    path = root / f"iter_{iteration:07d}" / f"mp_rank_{mp_rank:02d}" / "model_optim_rng.pt"
    return torch.load(path, weights_only=True)


def test_reshard_2_1_4_2_is_exact_and_training_continues(megatron_run: tuple[Path, dict[int, str]],
                                                         tmp_path: Path) -> None:
    source, straight = megatron_run
    previous = source
    for size in (1, 4, 2):
        target = tmp_path / f"mp{size}"
        convert("reshard", "--load", str(previous), "--save", str(target), "--model-parallel-size", str(size),
                "--iteration", "10", *DIVISIBLE)
        previous = target
    for rank in (0, 1):
        before, after = _file(source, rank), _file(previous, rank)
        # The per-rank attention-dropout generator is re-seeded when the size changes (documented).
        before["rng_states"].pop("rng_tracker_states")
        after["rng_states"].pop("rng_tracker_states")
        tensors_equal(before, after)
    resumed = run_training(1, TINY_GPT2 + NO_DROPOUT + ["--batch-size", "4", "--train-iters", "20",
                                                        "--load", str(tmp_path / "mp1")])
    assert_losses_close(losses(resumed.stdout), {i: straight[i] for i in range(11, 21)})


def _compare_with_hf(rank: int, world_size: int, load: str, hf_dir: str) -> None:
    """Our model (this world size) on the checkpoint vs transformers on the export; KV cache vs full."""
    import transformers

    from megatron import mpu
    from megatron.checkpoint.convert import partition_spec
    from megatron.inference import load_serial_weights
    from megatron.model import GPT2Model, KVCache

    mpu.initialize_model_parallel(world_size)
    mpu.model_parallel_cuda_manual_seed(0)
    checkpoint = read_checkpoint(load)
    model = GPT2Model(num_layers=2, vocab_size=8000, hidden_size=64, num_attention_heads=4,
                      embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0,
                      max_sequence_length=32, checkpoint_activations=False, parallel_output=False)
    for name, param in model.named_parameters():
        tags = (param.partition_dim, param.partition_stride) if getattr(param, "model_parallel", False) else None
        assert partition_spec(name) == tags, name
    load_serial_weights(model, checkpoint.model)
    model.eval()
    tokens = torch.randint(0, 8000, (3, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(tokens)
        theirs = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    cache = KVCache.empty(2)
    with torch.no_grad():
        pieces = [model(tokens[:, :20], kv_cache=cache)]
        pieces += [model(tokens[:, i:i + 1], kv_cache=cache) for i in range(20, 32)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), ours, atol=1e-5, rtol=1e-5)


def test_to_hf_matches_logits_and_round_trips_exactly(megatron_run: tuple[Path, dict[int, str]],
                                                      tmp_path: Path) -> None:
    source, _ = megatron_run
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    convert("to-hf", "--load", str(source), "--output", str(hf_dir), *TOKENIZER)
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {p.name for p in hf_dir.iterdir()}
    convert("from-hf", "--input", str(hf_dir), "--save", str(back), "--model-parallel-size", "2", *DIVISIBLE)
    for rank in (0, 1):
        path = back / "iter_0000000" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
        tensors_equal(_file(source, rank, 20)["model"], torch.load(path, weights_only=True)["model"])
    run_distributed(_compare_with_hf, 2, str(source), str(hf_dir))


def test_deepspeed_zero1_and_zero3_checkpoints_convert(demo_corpus: Path, tmp_path: Path) -> None:
    """ZeRO 3 keeps placeholders in the model files; its weights come back from the ZeRO shards."""
    exports = {}
    for stage in (1, 3):
        config = tmp_path / f"zero{stage}.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        save = tmp_path / f"ds{stage}"
        run_training(2, TINY_GPT2 + NO_DROPOUT + MP2 + ["--train-iters", "2", "--save", str(save),
                                                        "--deepspeed", "--deepspeed_config", str(config)])
        convert("to-hf", "--load", str(save), "--output", str(tmp_path / f"hf{stage}"), *TOKENIZER)
        from safetensors.torch import load_file

        exports[stage] = load_file(tmp_path / f"hf{stage}" / "model.safetensors")
    assert exports[1].keys() == exports[3].keys()
    for name, tensor in exports[1].items():
        torch.testing.assert_close(exports[3][name], tensor, atol=1e-5, rtol=1e-5, msg=name)
    reshard = convert("reshard", "--load", str(tmp_path / "ds3"), "--save", str(tmp_path / "mp1"),
                      "--model-parallel-size", "1", *DIVISIBLE)
    assert "optimizer state not converted" in reshard.stdout
    assert read_checkpoint(str(tmp_path / "mp1")).model.keys() == read_checkpoint(str(tmp_path / "ds1")).model.keys()


def test_from_hf_checkpoint_continues_training(demo_corpus: Path, tmp_path: Path) -> None:
    hf_dir = random_hf_model(tmp_path / "hf", std=0.02)
    convert("from-hf", "--input", str(hf_dir), "--save", str(tmp_path / "ckpt"), "--model-parallel-size", "2",
            *DIVISIBLE)
    out = run_training(2, TINY_GPT2 + MP2 + ["--train-iters", "3", "--load", str(tmp_path / "ckpt")])
    assert "loaded checkpoint" in out.stdout and "at iteration 0" in out.stdout
    assert sorted(losses(out.stdout)) == [1, 2, 3]


def test_bad_input_is_a_one_line_error(megatron_run: tuple[Path, dict[int, str]], tmp_path: Path) -> None:
    source, _ = megatron_run
    assert_one_line_error(convert("to-hf", "--load", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
                                  check=False), "does not exist")
    assert_one_line_error(convert("from-hf", "--input", str(source), "--save", str(tmp_path / "o"),
                                  "--model-parallel-size", "1", check=False), "not a Hugging Face model directory")
    assert_one_line_error(convert("reshard", "--load", str(source), "--save", str(tmp_path / "o"),
                                  "--model-parallel-size", "3", *DIVISIBLE, check=False), "divisible")


def test_from_hf_checkpoint_continues_on_deepspeed(demo_corpus: Path, tmp_path: Path) -> None:
    """An iteration-0 (weights only, no schedule) Megatron-layout checkpoint starts a DeepSpeed run
    through the universal copy (a fresh optimizer and schedule, the converted weights)."""
    import json

    hf_dir = random_hf_model(tmp_path / "hf", std=0.02)
    convert("from-hf", "--input", str(hf_dir), "--save", str(tmp_path / "ckpt"), "--model-parallel-size", "2",
            *DIVISIBLE)
    config = tmp_path / "z1.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    out = run_training(2, TINY_GPT2 + ["--train-iters", "3", "--load", str(tmp_path / "ckpt"), "--save",
                                       str(tmp_path / "ds"), "--deepspeed", "--deepspeed_config", str(config)])
    assert "resharded checkpoint" in out.stdout and "at iteration 0" in out.stdout
    assert sorted(losses(out.stdout)) == [1, 2, 3]
