"""BERT's WordPiece tokenizer (one ``vocab.txt``), encoded and trained with Hugging Face ``tokenizers``.

``WordPieceTokenizer`` reads a BERT ``vocab.txt`` (one token per line, the line number is the id)
and is what ``--tokenizer-type BertWordPieceLowerCase`` / ``BertWordPieceCase`` build.
``train_wordpiece`` writes such a file from any texts (``tools/train_wordpiece.py`` wraps it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import BertWordPieceTokenizer as HFBertWordPieceTokenizer

from megatron.tokenizer.tokenizer import (
    HFTokenizerBackend,
    TokenizerFileError,
    unreadable_file_error,
)

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
WORDPIECE_TYPES = {"BertWordPieceLowerCase": True, "BertWordPieceCase": False}  # name -> lowercase
MIN_VOCAB_SIZE = 100


def _read_vocab(vocab_file: str | os.PathLike) -> dict[str, int]:
    """Token -> id (its line number) of a BERT ``vocab.txt``; raises TokenizerFileError."""
    try:
        with open(vocab_file, encoding="utf-8") as handle:
            tokens = handle.read().split("\n")
    except FileNotFoundError:
        raise TokenizerFileError(f"--vocab-file {vocab_file} does not exist; pass a BERT vocab.txt or "
                                 "train one with `python tools/train_wordpiece.py`") from None
    except UnicodeDecodeError:
        raise TokenizerFileError(f"--vocab-file {vocab_file} is not UTF-8 text; a WordPiece "
                                 "tokenizer needs BERT's vocab.txt (one token per line)") from None
    except OSError as error:
        raise unreadable_file_error("--vocab-file", vocab_file, error) from None
    if tokens and tokens[-1] == "":
        tokens.pop()
    vocab = {token: index for index, token in enumerate(tokens)}
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise TokenizerFileError(f"--vocab-file {vocab_file} lacks {', '.join(missing)}; is it a "
                                 "BERT vocab.txt? (tools/train_wordpiece.py writes one)")
    return vocab


class WordPieceTokenizer(HFTokenizerBackend):
    """BERT WordPiece: ids are line numbers of ``vocab_file``; ``eod`` is ``[SEP]``.

    ``lowercase`` lower-cases and strips accents (``BertWordPieceLowerCase``); without it the
    text is kept as is (``BertWordPieceCase``). ``tokenize`` adds no special tokens.
    """

    def __init__(self, vocab_file: str | os.PathLike, lowercase: bool = True) -> None:
        vocab = _read_vocab(vocab_file)
        self.vocab_file, self.lowercase = os.fspath(vocab_file), lowercase
        self.name = "BertWordPieceLowerCase" if lowercase else "BertWordPieceCase"
        self._vocab_size = len(vocab)
        self.pad, self.unk, self.cls, self.sep, self.mask = (vocab[t] for t in SPECIAL_TOKENS)
        self._tokenizer = HFBertWordPieceTokenizer(self.vocab_file, lowercase=lowercase,
                                                   strip_accents=lowercase)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self.sep

    @property
    def special_ids(self) -> np.ndarray:
        """Ids of ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (never masked, never drawn as random tokens)."""
        return np.array([self.pad, self.unk, self.cls, self.sep, self.mask], dtype=np.int64)

    def __getstate__(self) -> dict:
        return {"vocab_file": self.vocab_file, "lowercase": self.lowercase}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vocab_file"], state["lowercase"])


def train_wordpiece(texts: Iterable[str], vocab_size: int, output_file: str | os.PathLike,
                    lowercase: bool = True, min_frequency: int = 2) -> Path:
    """Train a WordPiece vocabulary on ``texts`` and write it to ``output_file`` atomically.

    ``vocab_size`` counts the five special tokens, which get ids 0-4 (``[PAD]`` is 0).
    Returns the path written.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"--vocab-size {vocab_size} is too small for WordPiece; use at least "
                         f"{MIN_VOCAB_SIZE} (e.g. 8000 for a small corpus, 30522 for BERT's size)")
    tokenizer = HFBertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase)
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=output_file.parent,
                                         prefix=f".{output_file.name}.", delete=False)
    with handle:
        handle.write("".join(token + "\n" for token in tokens))
    os.replace(handle.name, output_file)
    return output_file
