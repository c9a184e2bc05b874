"""BERT masking: the fractions match the flags over a million tokens, specials stay, it is seeded."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.data.masking import MaskingConfig, mask_tokens
from megatron.errors import ConfigError

VOCAB = 8000
SPECIAL = np.arange(5)  # [PAD] [UNK] [CLS] [SEP] [MASK]
MASK_ID = 4
RANDOM_IDS = np.arange(5, VOCAB)


def _corpus(num_tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, VOCAB, num_tokens)


@pytest.mark.parametrize("config", [MaskingConfig(), MaskingConfig(0.3, 0.2, 0.05)])
def test_masking_stats(config: MaskingConfig, tol: float = 1e-3) -> None:
    """Selected, [MASK]ed, random and unchanged fractions of all tokens match the settings."""
    num_tokens, per_sample = 1_200_000, 512
    tokens = _corpus(num_tokens)
    counts = dict.fromkeys(("selected", "mask", "random", "unchanged"), 0)
    for index, start in enumerate(range(0, num_tokens, per_sample)):
        sample = tokens[start:start + per_sample]
        out = mask_tokens(sample, np.random.default_rng([7, index]), MASK_ID, SPECIAL, RANDOM_IDS, config)
        selected = out.loss_mask.astype(bool)
        counts["selected"] += selected.sum()
        counts["mask"] += (selected & (out.inputs == MASK_ID)).sum()
        counts["unchanged"] += (selected & (out.inputs == sample)).sum()
        counts["random"] += (selected & (out.inputs != MASK_ID) & (out.inputs != sample)).sum()
        assert (out.labels[selected] == sample[selected]).all()
        assert (out.inputs[~selected] == sample[~selected]).all()
    p = config.mask_prob
    # A random draw equals the original token with probability 1 / |RANDOM_IDS|: counted as unchanged.
    hit = 1.0 / len(RANDOM_IDS)
    expected = {"selected": p, "random": p * config.random_replace_prob * (1 - hit),
                "unchanged": p * (config.unmask_replace_prob + config.random_replace_prob * hit),
                "mask": p * (1 - config.random_replace_prob - config.unmask_replace_prob)}
    for name, value in expected.items():
        assert abs(counts[name] / num_tokens - value) < tol, (name, counts[name] / num_tokens, value)


def test_special_tokens_are_never_selected() -> None:
    tokens = np.random.default_rng(1).integers(0, 40, 200_000)
    out = mask_tokens(tokens, np.random.default_rng(2), MASK_ID, SPECIAL, RANDOM_IDS, MaskingConfig(0.9, 0.5, 0.2))
    special = np.isin(tokens, SPECIAL)
    assert special.sum() > 10_000
    assert not out.loss_mask[special].any()
    assert (out.inputs[special] == tokens[special]).all()
    replaced = out.loss_mask.astype(bool) & (out.inputs != MASK_ID)
    assert not np.isin(out.inputs[replaced], SPECIAL).any(), "random replacements are never special tokens"


def test_masking_depends_only_on_the_seed() -> None:
    tokens = _corpus(1000)
    first = mask_tokens(tokens, np.random.default_rng([3, 9]), MASK_ID, SPECIAL, RANDOM_IDS, MaskingConfig())
    again = mask_tokens(tokens, np.random.default_rng([3, 9]), MASK_ID, SPECIAL, RANDOM_IDS, MaskingConfig())
    other = mask_tokens(tokens, np.random.default_rng([3, 10]), MASK_ID, SPECIAL, RANDOM_IDS, MaskingConfig())
    assert all((getattr(first, k) == getattr(again, k)).all() for k in ("inputs", "labels", "loss_mask"))
    assert (first.loss_mask != other.loss_mask).any()


@pytest.mark.parametrize("config, message", [
    (MaskingConfig(mask_prob=1.5), "--mask-prob must be a probability"),
    (MaskingConfig(random_replace_prob=-0.1), "--random-replace-prob must be a probability"),
    (MaskingConfig(random_replace_prob=0.6, unmask_replace_prob=0.6), "exceed 1"),
])
def test_bad_probabilities_are_config_errors(config: MaskingConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.validate()
