"""GPT2Model: model-parallel sizes 2 and 4 equal size 1; dropout with checkpointing; it is GPT-2."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed

from megatron import mpu
from megatron.model import GPT2Model

VOCAB, PADDED_VOCAB = 60, 64
CONFIG = dict(num_layers=2, vocab_size=PADDED_VOCAB, hidden_size=32, num_attention_heads=4,
              max_sequence_length=16)


def _build(seed: int, dropout: float = 0.0, checkpoint: bool = False, parallel_output: bool = True) -> GPT2Model:
    torch.manual_seed(seed)
    model = GPT2Model(embedding_dropout_prob=dropout, attention_dropout_prob=dropout,
                      output_dropout_prob=dropout, checkpoint_activations=checkpoint,
                      parallel_output=parallel_output, **CONFIG)
    mpu.model_parallel_cuda_manual_seed(seed)
    return model


def _batch(seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (3, 13), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(model: GPT2Model) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    inputs, labels = _batch()
    logits = model(inputs, None, None)
    loss = mpu.vocab_parallel_cross_entropy(logits, labels, vocab_size=VOCAB).mean()
    loss.backward()
    gathered = mpu.gather_from_model_parallel_region(logits.detach())
    return gathered, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _shard_like(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "model_parallel", False):
        return full
    return mpu.partition_master_weight(full, param.partition_dim, mpu.get_model_parallel_world_size(),
                                       mpu.get_model_parallel_rank(), param.partition_stride)


def _check_equals_serial(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(1)
    serial = _build(seed=5)
    serial_logits, serial_loss, serial_grads = _loss_and_grads(serial)
    serial_weights = {n: p.detach().clone() for n, p in serial.named_parameters()}
    mpu.destroy_model_parallel()

    mpu.initialize_model_parallel(world_size)
    model = _build(seed=5)
    logits, loss, grads = _loss_and_grads(model)
    torch.testing.assert_close(logits, serial_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, serial_loss, atol=1e-6, rtol=1e-6)
    for name, param in model.named_parameters():
        # Initialisation does not depend on the model-parallel size.
        torch.testing.assert_close(param.detach(), _shard_like(param, serial_weights[name]), atol=0, rtol=0)
        torch.testing.assert_close(grads[name], _shard_like(param, serial_grads[name]), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_model_parallel_equals_serial(world_size: int) -> None:
    run_distributed(_check_equals_serial, world_size)


def _check_labels_give_the_logits_loss(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(world_size)
    inputs, labels = _batch()
    results = []
    for fused in (False, True):
        model = _build(seed=5)
        model.loss_vocab_size = VOCAB
        if fused:
            losses = model(inputs, None, None, labels=labels)
        else:
            losses = mpu.vocab_parallel_cross_entropy(model(inputs, None, None), labels, vocab_size=VOCAB)
        weights = torch.arange(1.0, losses.numel() + 1).view_as(losses) / losses.numel()  # per-token
        (losses * weights).sum().backward()
        results.append((losses.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (losses, grads), (fused_losses, fused_grads) = results
    assert fused_losses.shape == labels.shape and fused_losses.dtype == torch.float32
    torch.testing.assert_close(fused_losses, losses, atol=1e-6, rtol=1e-6)
    for name in grads:
        # fp32 sums taken in another order (G @ W then rows scaled, not the scaled G @ W)
        torch.testing.assert_close(fused_grads[name], grads[name], atol=1e-6, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_labels_give_the_loss_of_the_logits(world_size: int) -> None:
    """Training's fused output layer + loss equals the cross-entropy of the returned logits."""
    run_distributed(_check_labels_give_the_logits_loss, world_size)


def _check_checkpointing_with_dropout(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(world_size)
    results = []
    for checkpoint in (False, True):
        model = _build(seed=3, dropout=0.2, checkpoint=checkpoint)
        model.train()
        results.append(_loss_and_grads(model))
    (_, loss_plain, grads_plain), (_, loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_plain, loss_ckpt, atol=0, rtol=0)
    for name in grads_plain:
        torch.testing.assert_close(grads_plain[name], grads_ckpt[name], atol=1e-7, rtol=1e-6)
    # Dropout is really on: evaluation mode gives another loss.
    model.eval()
    _, loss_eval, _ = _loss_and_grads(model)
    assert not torch.equal(loss_eval, loss_plain)


@pytest.mark.parametrize("world_size", [1, 2])
def test_activation_checkpointing_with_dropout_gives_identical_gradients(world_size: int) -> None:
    run_distributed(_check_checkpointing_with_dropout, world_size)


def _check_attention_mask_argument(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(world_size)
    model = _build(seed=2)
    inputs, _ = _batch()
    seq = inputs.size(1)
    causal = torch.tril(torch.ones(1, 1, seq, seq))
    positions = torch.arange(seq).unsqueeze(0).expand_as(inputs)
    torch.testing.assert_close(model(inputs, positions, causal), model(inputs, None, None), atol=1e-6, rtol=1e-6)


def test_original_attention_mask_equals_plain_causal() -> None:
    run_distributed(_check_attention_mask_argument, 2)


def _check_against_transformers(rank: int, world_size: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from megatron.model.hf_gpt2 import from_hf_state_dict, to_hf_state_dict

    mpu.initialize_model_parallel(1)
    model = _build(seed=9, parallel_output=False).eval()
    config = GPT2Config(vocab_size=VOCAB, n_positions=CONFIG["max_sequence_length"], n_embd=CONFIG["hidden_size"],
                        n_layer=CONFIG["num_layers"], n_head=CONFIG["num_attention_heads"],
                        activation_function="gelu_new", layer_norm_epsilon=1e-5,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_model = GPT2LMHeadModel(config).eval()
    missing, unexpected = hf_model.load_state_dict(to_hf_state_dict(model.state_dict(), VOCAB), strict=False)
    assert not unexpected and all(".attn.bias" in k or "masked_bias" in k for k in missing), (missing, unexpected)
    inputs, _ = _batch()
    with torch.no_grad():
        ours = model(inputs, None, None)[..., :VOCAB]
        theirs = hf_model(inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    round_trip = from_hf_state_dict(hf_model.state_dict(), PADDED_VOCAB)
    for name, tensor in model.state_dict().items():
        expected = tensor.clone()
        if name == "word_embeddings.weight":
            expected[VOCAB:] = 0
        torch.testing.assert_close(round_trip[name], expected, atol=0, rtol=0)


def test_weights_in_transformers_gpt2_give_the_same_logits() -> None:
    run_distributed(_check_against_transformers, 1)
