"""A word-level tokenizer over the restaurant world's closed vocabulary.

GPT-2 (the paper's base model) uses byte-pair encoding so that any text can be encoded. Our world
is closed -- every word it writes is known in advance -- so one token per word is enough, and the
whole vocabulary (specials included) fits the tiny model's `vocab_size = 96` embedding rows.
A word outside the vocabulary is an error, never a silent <unk>.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from functools import lru_cache

from .text import join_words, split_words
from .world import world_words

PAD, BOS, EOS, SEP = "<pad>", "<bos>", "<eos>", "=>"
SPECIAL_TOKENS = (PAD, BOS, EOS, SEP)

# Rows of the tiny model's embedding matrix. The tokenizer uses the first `vocab_size` of them;
# the rest are padding (never produced by `encode`; rendered as "<unused>" by `decode`).
VOCAB_SIZE = 96
UNUSED = "<unused>"


class Tokenizer:
    """Maps words to ids and back: `encode("the eagle is a pub.") -> [ids]`, `decode(ids) -> str`.

    Text is lowercased and split into words and punctuation (`text.split_words`); `decode` joins
    them back in the world's canonical spacing, so `decode(encode(s)) == s` for every text the
    world writes.
    """

    def __init__(self, tokens: Sequence[str]):
        tokens = tuple(tokens)
        if len(set(tokens)) != len(tokens):
            duplicates = sorted({t for t in tokens if tokens.count(t) > 1})
            raise ValueError(f"duplicate tokens in the vocabulary: {duplicates}")
        missing = [t for t in SPECIAL_TOKENS if t not in tokens]
        if missing:
            raise ValueError(f"the vocabulary must contain the special tokens {list(SPECIAL_TOKENS)}; "
                             f"missing {missing}")
        self.id_to_token: tuple[str, ...] = tokens
        self.token_to_id: dict[str, int] = {token: i for i, token in enumerate(tokens)}
        self.pad_id = self.token_to_id[PAD]
        self.bos_id = self.token_to_id[BOS]
        self.eos_id = self.token_to_id[EOS]
        self.sep_id = self.token_to_id[SEP]  # "=>", between prompt x and target y

    @classmethod
    def default(cls) -> Tokenizer:
        """The restaurant world's tokenizer: specials first (<pad> = 0), then the world's words."""
        return _default_tokenizer()

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def encode(self, text: str) -> list[int]:
        """Text -> token ids; raises ValueError on a word outside the closed vocabulary."""
        ids = []
        for position, word in enumerate(split_words(text)):
            token_id = self.token_to_id.get(word)
            if token_id is None:
                raise ValueError(self._unknown_word_message(word, position, text))
            ids.append(token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Token ids -> text. `skip_special=True` drops <pad>, <bos> and <eos> (keeps "=>")."""
        skipped = {self.pad_id, self.bos_id, self.eos_id} if skip_special else set()
        words = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id in skipped:
                continue
            if 0 <= token_id < self.vocab_size:
                words.append(self.id_to_token[token_id])
            elif self.vocab_size <= token_id < VOCAB_SIZE:
                words.append(UNUSED)
            else:
                raise ValueError(f"token id {token_id} is out of range: ids run from 0 to "
                                 f"{max(self.vocab_size, VOCAB_SIZE) - 1}")
        return join_words(words)

    def tokens(self, text: str) -> list[str]:
        """The words `text` is split into (each one token)."""
        return split_words(text)

    def _unknown_word_message(self, word: str, position: int, text: str) -> str:
        message = (f"unknown word {word!r} at position {position} in {text!r}: the vocabulary is "
                   f"closed ({self.vocab_size} tokens of the restaurant world)")
        close = difflib.get_close_matches(word, self.id_to_token, n=3, cutoff=0.6)
        if close:
            message += "; close words: " + ", ".join(repr(w) for w in close)
        return message

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


@lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(SPECIAL_TOKENS + tuple(world_words()))
    if tokenizer.vocab_size > VOCAB_SIZE:
        raise RuntimeError(f"the restaurant world has {tokenizer.vocab_size} tokens but the model "
                           f"has only VOCAB_SIZE = {VOCAB_SIZE} embedding rows; remove words "
                           f"from the templates in minilora/data/world.py")
    return tokenizer
