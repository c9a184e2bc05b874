"""BertModel: model-parallel size 2 equals size 1 (post- and pre-LayerNorm); padding is masked."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from distributed import run_distributed

from megatron import mpu
from megatron.model.bert_modeling import BertConfig, BertModel

VOCAB, PADDED_VOCAB = 60, 64


def _config(pre_layernorm: bool, dropout: float = 0.0) -> BertConfig:
    return BertConfig(num_layers=2, vocab_size=PADDED_VOCAB, hidden_size=32, num_attention_heads=4,
                      max_sequence_length=16, hidden_dropout=dropout, attention_dropout=dropout,
                      pre_layernorm=pre_layernorm)


def _build(config: BertConfig, seed: int = 5) -> BertModel:
    torch.manual_seed(seed)
    model = BertModel(config)
    mpu.model_parallel_cuda_manual_seed(seed)
    return model


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(5, VOCAB, (3, 12), generator=gen)
    padding = torch.ones_like(tokens)
    padding[1, 8:] = 0
    types = (torch.arange(12) >= 6).long().expand(3, 12)
    return {"text": tokens, "padding_mask": padding, "types": types,
            "labels": torch.randint(5, VOCAB, (3, 12), generator=gen),
            "loss_mask": (torch.rand(3, 12, generator=gen) < 0.3).float() * padding,
            "sentence_label": torch.tensor([0, 1, 1])}


def _loss_and_grads(model: BertModel) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    batch = _batch()
    lm_logits, binary_logits = model(batch["text"], batch["padding_mask"], batch["types"])
    lm = mpu.vocab_parallel_cross_entropy(lm_logits, batch["labels"], vocab_size=VOCAB)
    loss = (lm * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    loss = loss + F.cross_entropy(binary_logits, batch["sentence_label"])
    loss.backward()
    gathered = mpu.gather_from_model_parallel_region(lm_logits.detach())
    return gathered, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _shard_like(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "model_parallel", False):
        return full
    return mpu.partition_master_weight(full, param.partition_dim, mpu.get_model_parallel_world_size(),
                                       mpu.get_model_parallel_rank(), param.partition_stride)


def _check_equals_serial(rank: int, world_size: int, pre_layernorm: bool) -> None:
    mpu.initialize_model_parallel(1)
    serial = _build(_config(pre_layernorm))
    serial_logits, serial_loss, serial_grads = _loss_and_grads(serial)
    serial_weights = {n: p.detach().clone() for n, p in serial.named_parameters()}
    mpu.destroy_model_parallel()

    mpu.initialize_model_parallel(world_size)
    model = _build(_config(pre_layernorm))
    logits, loss, grads = _loss_and_grads(model)
    torch.testing.assert_close(logits, serial_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, serial_loss, atol=1e-6, rtol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), _shard_like(param, serial_weights[name]), atol=0, rtol=0)
        torch.testing.assert_close(grads[name], _shard_like(param, serial_grads[name]), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _check_all(rank: int, world_size: int) -> None:
    _check_padding_and_bidirectional(rank, world_size)
    mpu.destroy_model_parallel()
    for pre_layernorm in (False, True):
        _check_equals_serial(rank, world_size, pre_layernorm)
        mpu.destroy_model_parallel()


def test_model_parallel_2_equals_serial_post_and_pre_layernorm() -> None:
    """One pair of spawned ranks checks padding, bidirectionality and both LayerNorm placements."""
    run_distributed(_check_all, 2)



def _check_padding_and_bidirectional(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(1)
    model = _build(_config(False)).eval()
    batch = _batch()
    tokens, padding = batch["text"][1:2], batch["padding_mask"][1:2]
    logits, _ = model(tokens, padding)
    changed_pad = tokens.clone()
    changed_pad[0, 10] = 7
    logits_pad, _ = model(changed_pad, padding)
    torch.testing.assert_close(logits_pad[0, :8], logits[0, :8], atol=1e-6, rtol=1e-6)  # padding is not attended
    changed_late = tokens.clone()
    changed_late[0, 6] = 9
    logits_late, _ = model(changed_late, padding)
    assert not torch.allclose(logits_late[0, 0], logits[0, 0]), "early positions see later tokens"

