"""Map a serial (model-parallel size 1) ``GPT2Model`` state dict to and from Hugging Face's GPT-2.

Hugging Face stores linear weights as ``Conv1D`` (in, out); ours are torch's (out, in). Its
vocabulary is unpadded; ours is padded, and the padding rows are dropped or zero-filled.
"""

from __future__ import annotations

import torch

_LAYER_LINEARS = {
    "attention.query_key_value": "attn.c_attn",
    "attention.dense": "attn.c_proj",
    "mlp.dense_h_to_4h": "mlp.c_fc",
    "mlp.dense_4h_to_h": "mlp.c_proj",
}
_LAYER_NORMS = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2"}


def num_layers_in(state_dict: dict[str, torch.Tensor]) -> int:
    layer_ids = {int(k.split(".")[2]) for k in state_dict if k.startswith("transformer.layers.")}
    return max(layer_ids) + 1 if layer_ids else 0


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Our serial state dict -> ``GPT2LMHeadModel`` state dict (``lm_head`` tied to ``wte``)."""
    wte = state_dict["word_embeddings.weight"][:vocab_size].clone()
    hf = {
        "transformer.wte.weight": wte,
        "transformer.wpe.weight": state_dict["position_embeddings.weight"].clone(),
        "transformer.ln_f.weight": state_dict["transformer.final_layernorm.weight"].clone(),
        "transformer.ln_f.bias": state_dict["transformer.final_layernorm.bias"].clone(),
        "lm_head.weight": wte,
    }
    for i in range(num_layers_in(state_dict)):
        ours, theirs = f"transformer.layers.{i}.", f"transformer.h.{i}."
        for our_name, hf_name in _LAYER_NORMS.items():
            for kind in ("weight", "bias"):
                hf[f"{theirs}{hf_name}.{kind}"] = state_dict[f"{ours}{our_name}.{kind}"].clone()
        for our_name, hf_name in _LAYER_LINEARS.items():
            hf[f"{theirs}{hf_name}.weight"] = state_dict[f"{ours}{our_name}.weight"].t().contiguous()
            hf[f"{theirs}{hf_name}.bias"] = state_dict[f"{ours}{our_name}.bias"].clone()
    return hf


def from_hf_state_dict(hf: dict[str, torch.Tensor], padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` (or ``GPT2Model``) state dict -> our serial state dict."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    wte = hf["wte.weight"]
    padded = torch.zeros(padded_vocab_size, wte.size(1), dtype=wte.dtype)
    padded[: wte.size(0)] = wte
    ours = {
        "word_embeddings.weight": padded,
        "position_embeddings.weight": hf["wpe.weight"].clone(),
        "transformer.final_layernorm.weight": hf["ln_f.weight"].clone(),
        "transformer.final_layernorm.bias": hf["ln_f.bias"].clone(),
    }
    layer_ids = {int(k.split(".")[1]) for k in hf if k.startswith("h.")}
    for i in sorted(layer_ids):
        theirs, mine = f"h.{i}.", f"transformer.layers.{i}."
        for our_name, hf_name in _LAYER_NORMS.items():
            for kind in ("weight", "bias"):
                ours[f"{mine}{our_name}.{kind}"] = hf[f"{theirs}{hf_name}.{kind}"].clone()
        for our_name, hf_name in _LAYER_LINEARS.items():
            ours[f"{mine}{our_name}.weight"] = hf[f"{theirs}{hf_name}.weight"].t().contiguous()
            ours[f"{mine}{our_name}.bias"] = hf[f"{theirs}{hf_name}.bias"].clone()
    return ours
