"""BERT's masked-LM corruption of one sequence, deterministic given a numpy ``Generator``.

Each non-special token is selected with probability ``mask_prob``. A selected token is replaced
by a random (non-special) token with probability ``random_replace_prob``, left unchanged with
probability ``unmask_replace_prob``, and replaced by ``[MASK]`` otherwise. The loss is taken on
selected positions only. Seed the generator per sample (``default_rng([seed, index])``) and the
corruption of sample ``index`` is the same in every run, so resuming from a checkpoint is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron.errors import ConfigError


@dataclass(frozen=True)
class MaskingConfig:
    """Probabilities of BERT's masking (defaults: BERT's 15% / 10% / 10%)."""

    mask_prob: float = 0.15  # fraction of (non-special) tokens selected for prediction
    random_replace_prob: float = 0.1  # of the selected: replaced by a random token
    unmask_replace_prob: float = 0.1  # of the selected: kept as they are

    def validate(self) -> None:
        """Raise ConfigError naming the flag when a probability is out of range."""
        for flag, value in (("--mask-prob", self.mask_prob),
                            ("--random-replace-prob", self.random_replace_prob),
                            ("--unmask-replace-prob", self.unmask_replace_prob)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{flag} must be a probability in [0, 1], got {value}")
        if self.random_replace_prob + self.unmask_replace_prob > 1.0:
            raise ConfigError(f"--random-replace-prob ({self.random_replace_prob}) + --unmask-replace-prob "
                              f"({self.unmask_replace_prob}) exceed 1; lower one of them")


@dataclass
class MaskedTokens:
    """One corrupted sequence; all arrays have the input's shape."""

    inputs: np.ndarray  # int64: the tokens the model sees
    labels: np.ndarray  # int64: the original token where selected, else 0
    loss_mask: np.ndarray  # int64: 1 where selected


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, mask_id: int, special_ids: np.ndarray,
                random_ids: np.ndarray, config: MaskingConfig) -> MaskedTokens:
    """Corrupt ``tokens`` (1-D ints) for masked-LM; tokens in ``special_ids`` are never selected.

    Random replacements are drawn uniformly from ``random_ids``. Draws exactly three arrays from
    ``rng`` (selection, action, replacements), so a sample's result depends only on its tokens
    and the generator's seed.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    candidates = ~np.isin(tokens, special_ids)
    selected = candidates & (rng.random(tokens.shape) < config.mask_prob)
    action = rng.random(tokens.shape)
    random_cut = config.random_replace_prob
    keep_cut = random_cut + config.unmask_replace_prob
    replace_random = selected & (action < random_cut)
    replace_mask = selected & (action >= keep_cut)
    inputs = tokens.copy()
    inputs[replace_mask] = mask_id
    inputs[replace_random] = random_ids[rng.integers(0, len(random_ids), int(replace_random.sum()))]
    labels = np.where(selected, tokens, 0)
    return MaskedTokens(inputs, labels, selected.astype(np.int64))
