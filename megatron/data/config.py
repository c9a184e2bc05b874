"""``DataConfig``: where the training data and the tokenizer come from (the 'data' flags)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataConfig:
    """The data flags of ``megatron.data.arguments.add_data_args``, field for field, plus the seed
    that shuffles the samples. Validated by ``megatron.data.arguments.validate_data_args``."""

    train_data: list[str] | None = None  # loose-JSON files or registered corpus names
    valid_data: list[str] | None = None
    test_data: list[str] | None = None
    data_dir: str = "data"  # where registered corpora (webtext) live
    data_path: list[str] | None = None  # .bin/.idx prefix, or weight/prefix pairs
    text_key: str = "text"
    lazy_loader: bool = False
    split: str = "949,50,1"
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_type: str = "GPT2BPETokenizer"
    seq_length: int = 1024
    skip_bad_lines: bool = False
    num_workers: int = 2
    cache_dir: str | None = None
    demo_data_dir: str = "data/demo"
    seed: int = 1234
