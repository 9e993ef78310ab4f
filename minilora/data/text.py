"""Splitting text into words and joining words back into text (no vocabulary involved).

The restaurant world writes its text in one canonical form, and `join_words(split_words(s)) == s`
holds for every such text:

    the eagle is a pub near avalon. it serves french food.
    name[the eagle] eattype[pub] food[french]

Rules of the canonical form:
- everything is lowercase;
- ".", ",", "?" and "]" are words of their own, written straight after the previous word;
- a slot opener such as "food[" is ONE word (the slot name is a token), and the next word follows it
  without a space;
- every other pair of words is separated by exactly one space.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Order matters: specials ("<bos>"), the separator "=>", slot openers ("food[") before plain words.
WORD_PATTERN = re.compile(r"<\w+>|=>|\w+\[|\w+|[^\w\s]")

# Written straight after the previous word, without a space.
ATTACH_LEFT = frozenset({".", ",", "?", "]"})


def normalise(text: str) -> str:
    """Lowercase, and accept "food [" as "food[" (a looser spelling of a slot opener)."""
    return re.sub(r"(\w)\s+\[", r"\1[", text.lower())


def split_words(text: str) -> list[str]:
    """Split text into words: `"The Eagle, a pub."` -> `["the", "eagle", ",", "a", "pub", "."]`."""
    return WORD_PATTERN.findall(normalise(text))


def join_words(words: Iterable[str]) -> str:
    """Inverse of `split_words` on canonical text: punctuation and "]" attach to the left,
    a slot opener ("food[") attaches to the right, everything else is separated by one space."""
    pieces: list[str] = []
    previous = None
    for word in words:
        if previous is not None and word not in ATTACH_LEFT and not previous.endswith("["):
            pieces.append(" ")
        pieces.append(word)
        previous = word
    return "".join(pieces)


def count_words(text: str) -> int:
    """Number of tokens `text` encodes to (every word is one token of the closed vocabulary)."""
    return len(split_words(text))
