"""The "restaurant world": a tiny, offline stand-in for the E2E NLG Challenge data.

The LoRA paper (Hu et al. 2021, Sec. 5.5) fine-tunes GPT-2 on E2E NLG (Novikova et al. 2017):
a restaurant is given as a meaning representation (MR), a set of slot-value pairs such as

    name[The Eagle], eatType[pub], food[French], area[riverside]

and the model writes a description of it. This module is that world in miniature: 8 slots with
small value sets, several sentence templates per slot, everything lowercase and drawn from a
closed vocabulary of fewer than 96 words, so that a tiny model can learn it in minutes on a CPU.

An MR here is a plain dict `{slot: value}`: `name` is always present, and 2 to 7 of the other
slots are. Everything is generated from integer seeds through `Rng`, which only uses
`random.Random.random()` -- the one method whose output Python guarantees across versions -- so
the data sets are the same on every machine and every Python.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping, Sequence

from .text import count_words, split_words

# ---------------------------------------------------------------------------------------------
# Slots and values
# ---------------------------------------------------------------------------------------------

SLOTS = ("name", "eatType", "food", "priceRange", "customerRating", "area", "familyFriendly", "near")
OPTIONAL_SLOTS = SLOTS[1:]
MIN_OPTIONAL_SLOTS, MAX_OPTIONAL_SLOTS = 2, len(OPTIONAL_SLOTS)

NAMES = ("the eagle", "the mill", "blue spice", "zizzi", "aromi", "giraffe")
LANDMARKS = ("cafe rouge", "burger king", "avalon")

VALUES: dict[str, tuple[str, ...]] = {
    "name": NAMES,
    "eatType": ("pub", "restaurant", "coffee shop"),
    "food": ("french", "italian", "english", "chinese", "indian", "japanese"),
    "priceRange": ("cheap", "moderate", "expensive"),
    "customerRating": ("low", "average", "high"),
    "area": ("riverside", "city centre"),
    "familyFriendly": ("yes", "no"),
    "near": NAMES + LANDMARKS,  # never the restaurant's own name
}

# The word a slot is written as in a linearisation: "eatType" -> the token "eattype[".
SLOT_TOKENS = {slot: slot.lower() + "[" for slot in SLOTS}
SLOT_OF_TOKEN = {token: slot for slot, token in SLOT_TOKENS.items()}
CLOSE_SLOT = "]"

# How an area value reads inside a sentence: "in the riverside area", "in the city centre".
AREA_PHRASES = {"riverside": "riverside area", "city centre": "city centre"}

# Every sequence [bos] prompt [sep] target [eos] of every task fits the tiny model's context.
MAX_SEQUENCE_TOKENS = 64


# ---------------------------------------------------------------------------------------------
# Deterministic randomness
# ---------------------------------------------------------------------------------------------

class Rng:
    """A seeded random source built only on `random.Random.random()`.

    Python promises that `random.Random(seed).random()` gives the same numbers on every version;
    it does not promise that for `choice`, `shuffle` or `sample`. Building those three here keeps
    every data set byte-for-byte reproducible.
    """

    def __init__(self, seed: int):
        if not isinstance(seed, int):
            raise TypeError(f"Rng seed must be an int, got {type(seed).__name__}")
        self._random = random.Random(seed)

    def below(self, n: int) -> int:
        """A uniform integer in [0, n)."""
        return min(int(self._random.random() * n), n - 1)

    def chance(self, probability: float) -> bool:
        return self._random.random() < probability

    def choice(self, items: Sequence):
        return items[self.below(len(items))]

    def shuffled(self, items: Sequence) -> list:
        """A shuffled copy (Fisher-Yates)."""
        out = list(items)
        for i in range(len(out) - 1, 0, -1):
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out


# ---------------------------------------------------------------------------------------------
# Meaning representations
# ---------------------------------------------------------------------------------------------

def validate_mr(mr: Mapping[str, str]) -> dict[str, str]:
    """Check an MR against the world and return it as a dict in canonical slot order."""
    mr = dict(mr)
    unknown = [slot for slot in mr if slot not in VALUES]
    if unknown:
        raise ValueError(f"unknown slot(s) {unknown}; the slots are {list(SLOTS)}")
    if "name" not in mr:
        raise ValueError(f"an MR needs a 'name' slot, got {mr}")
    for slot, value in mr.items():
        if value not in VALUES[slot]:
            raise ValueError(f"{slot}={value!r} is not a value of the world; "
                             f"{slot} takes one of {list(VALUES[slot])}")
    if mr.get("near") == mr["name"]:
        raise ValueError(f"a restaurant cannot be near itself: {mr}")
    return {slot: mr[slot] for slot in SLOTS if slot in mr}


def random_mr(rng: Rng) -> dict[str, str]:
    """A random restaurant: a name plus 2..7 of the 7 other slots, values uniform."""
    name = rng.choice(NAMES)
    n_optional = MIN_OPTIONAL_SLOTS + rng.below(MAX_OPTIONAL_SLOTS - MIN_OPTIONAL_SLOTS + 1)
    chosen = set(rng.shuffled(OPTIONAL_SLOTS)[:n_optional])
    mr = {"name": name}
    for slot in OPTIONAL_SLOTS:
        if slot in chosen:
            choices = [v for v in VALUES[slot] if v != name]
            mr[slot] = rng.choice(choices)
    return mr


def linearise(mr: Mapping[str, str]) -> str:
    """The MR as text in fixed slot order, E2E style: `name[the eagle] eattype[pub] food[french]`."""
    return _linearise(validate_mr(mr))


def _linearise(mr: Mapping[str, str]) -> str:
    """`linearise` without the checks, for MRs the world made itself (the hot loop)."""
    return " ".join(f"{SLOT_TOKENS[slot]}{mr[slot]}{CLOSE_SLOT}" for slot in SLOTS if slot in mr)


def parse_mr(text: str) -> dict[str, str]:
    """Read a linearisation back into a dict; tolerant, for scoring model outputs.

    Unknown slot names, words outside brackets, empty values and repeated slots (the first one
    wins) are skipped, and a missing "]" ends the value at the next slot or at the end of the
    text, so a malformed output gives a partial dict instead of an error. Values are not checked
    against the world: `parse_mr("food[pizza]") == {"food": "pizza"}`.
    """
    mr: dict[str, str] = {}
    slot, value_words = None, []

    def close():
        if slot is not None and value_words and slot not in mr:
            mr[slot] = " ".join(value_words)

    for word in split_words(text):
        if word.endswith("["):
            close()
            slot, value_words = SLOT_OF_TOKEN.get(word), []
        elif word == CLOSE_SLOT:
            close()
            slot, value_words = None, []
        elif slot is not None:
            value_words.append(word)
    close()
    return mr


def split_of(mr: Mapping[str, str]) -> str:
    """Which split an MR belongs to: "test" (10 %), "val" (10 %) or "train" (80 %).

    Decided by a hash of the linearisation, so an MR is in the same split for every task and in
    the pretraining corpus only if it is a "train" MR: val and test restaurants are never seen
    before evaluation, in any form.
    """
    return split_of_linearisation(_linearise(validate_mr(mr)))


def split_of_linearisation(linearisation: str) -> str:
    """`split_of` for an MR given as its (canonical) linearisation."""
    digest = hashlib.sha256(linearisation.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:4], "big") % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


# ---------------------------------------------------------------------------------------------
# Descriptions (the "natural language" side of the world)
# ---------------------------------------------------------------------------------------------

def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# The first sentence introduces the name, with a noun phrase built from eatType (or "place"),
# optionally food, and optionally the area and near slots folded in as `{where}`.
INTRO_TEMPLATES = (
    "{name} is {noun_phrase}{where}.",
    "there is {noun_phrase} called {name}{where}.",
    "you can find {noun_phrase} called {name}{where}.",
)
WHERE_TEMPLATES = {
    "area": (" in the {v}",),
    "near": (" near {v}", " close to {v}"),
}

# Verb phrases with the subject "it"; `{v}` is the value and `{a}` its article ("a"/"an").
PREDICATES = {
    "food": ("serves {v} food", "offers {v} food", "has {v} food"),
    "priceRange": ("has {v} prices", "has {a} {v} price range", "is in the {v} price range"),
    "customerRating": ("has {a} {v} customer rating", "is rated {v} by customers", "has {a} {v} rating"),
    "area": ("is in the {v}", "is located in the {v}", "is found in the {v}"),
    "near": ("is near {v}", "is close to {v}", "is located near {v}"),
    ("familyFriendly", "yes"): ("is family friendly", "is kid friendly", "welcomes children"),
    ("familyFriendly", "no"): ("is not family friendly", "is not kid friendly", "does not welcome children"),
}

# Whole sentences for a single slot, as another way to say the same thing.
SENTENCES = {
    "food": ("its food is {v}.",),
    "priceRange": ("its prices are {v}.", "prices are {v}."),
    "customerRating": ("its customer rating is {v}.", "its rating is {v}."),
    "area": ("you can find it in the {v}.",),
    "near": ("you can find it near {v}.",),
    ("familyFriendly", "yes"): ("children are welcome.",),
    ("familyFriendly", "no"): ("children are not welcome.",),
}


def _surface(slot: str, value: str) -> str:
    """How a value reads inside a sentence."""
    return AREA_PHRASES[value] if slot == "area" else value


def _fill(template: str, slot: str, value: str) -> str:
    v = _surface(slot, value)
    return template.format(v=v, a=article(v))


def _templates(table: dict, slot: str, value: str) -> tuple[str, ...]:
    return table.get((slot, value)) or table.get(slot, ())


def _join_predicates(predicates: list[str]) -> str:
    if len(predicates) == 1:
        return predicates[0]
    return ", ".join(predicates[:-1]) + " and " + predicates[-1]


def _realise(mr: dict[str, str], rng: Rng, compact: bool = False) -> str:
    """One description that mentions every slot of `mr` exactly once.

    `compact=True` gives the shortest form (everything possible folded into the first sentence,
    the rest in one list sentence), used when a random realisation is too long.
    """
    remaining = [slot for slot in OPTIONAL_SLOTS if slot in mr]

    # First sentence: "{name} is an italian pub in the riverside area near avalon."
    adjectives = []
    if "food" in mr and (compact or rng.chance(0.5)):
        adjectives.append(mr["food"])
        remaining.remove("food")
    head = mr.get("eatType", "place")
    if "eatType" in mr:
        remaining.remove("eatType")
    noun_phrase = " ".join(adjectives + [head])
    noun_phrase = f"{article(noun_phrase)} {noun_phrase}"
    where = ""
    for slot in ("area", "near"):
        if slot in mr and (compact or rng.chance(0.5)):
            template = WHERE_TEMPLATES[slot][0] if compact else rng.choice(WHERE_TEMPLATES[slot])
            where += _fill(template, slot, mr[slot])
            remaining.remove(slot)
    intro = INTRO_TEMPLATES[0] if compact else rng.choice(INTRO_TEMPLATES)
    sentences = [intro.format(name=mr["name"], noun_phrase=noun_phrase, where=where)]

    # The other slots: "it serves french food and has cheap prices." / "children are welcome."
    if compact:
        if remaining:
            predicates = [_fill(_templates(PREDICATES, s, mr[s])[0], s, mr[s]) for s in remaining]
            sentences.append(f"it {_join_predicates(predicates)}.")
        return " ".join(sentences)
    remaining = rng.shuffled(remaining)
    while remaining:
        size = 1 + rng.below(min(3, len(remaining)))
        group, remaining = remaining[:size], remaining[size:]
        if size == 1 and rng.chance(0.4):
            slot = group[0]
            sentences.append(_fill(rng.choice(_templates(SENTENCES, slot, mr[slot])), slot, mr[slot]))
        else:
            predicates = [_fill(rng.choice(_templates(PREDICATES, s, mr[s])), s, mr[s]) for s in group]
            sentences.append(f"it {_join_predicates(predicates)}.")
    return " ".join(sentences)


def description_budget(mr: Mapping[str, str]) -> int:
    """Most words a description of `mr` may have so that [bos] MR [sep] description [eos] fits."""
    return MAX_SEQUENCE_TOKENS - 3 - count_words(_linearise(mr))


def describe(mr: Mapping[str, str], rng: Rng, max_attempts: int = 20) -> str:
    """A random description of `mr` that realises every slot exactly once and fits the budget.

    The E2E references are written by people; here a template grammar stands in for them:
    3 opening sentences, 2-3 verb phrases per slot value, whole-sentence variants, and random
    grouping of the remaining slots into sentences.
    """
    mr = validate_mr(mr)
    budget = description_budget(mr)
    for _ in range(max_attempts):
        text = _realise(mr, rng)
        if count_words(text) <= budget:
            return text
    return _realise(mr, rng, compact=True)


# ---------------------------------------------------------------------------------------------
# Questions about a restaurant (the hypothesis side of the `classify` task)
# ---------------------------------------------------------------------------------------------

# Each question asks whether slot == value; familyFriendly is always asked as "yes".
QUESTIONS = {
    "eatType": "is it {a} {v}?",
    "food": "does it serve {v} food?",
    "priceRange": "does it have {v} prices?",
    "customerRating": "does it have {a} {v} customer rating?",
    "area": "is it in the {v}?",
    "near": "is it near {v}?",
    "familyFriendly": "is it family friendly?",
}


# The answers, as in MNLI's three classes: the description entails the question's claim ("yes"),
# contradicts it ("no"), or does not mention that slot ("maybe" = neutral).
ANSWERS = ("yes", "no", "maybe")


def answer(mr: Mapping[str, str], slot: str, value: str) -> str:
    """The answer to `question(slot, value)` about the restaurant `mr`."""
    if slot not in mr:
        return "maybe"
    return "yes" if mr[slot] == value else "no"


def question(slot: str, value: str) -> str:
    """The yes/no question "does the restaurant have slot == value?"."""
    if slot not in QUESTIONS:
        raise ValueError(f"no question for slot {slot!r}; questions exist for {list(QUESTIONS)}")
    return _fill(QUESTIONS[slot], slot, value)


# ---------------------------------------------------------------------------------------------
# Finding slot values in a text (what the slot error rate counts)
# ---------------------------------------------------------------------------------------------

_NEAR_CUE = r"(?:near|close to)"
_VALUE_PATTERNS = {
    "eatType": {v: re.compile(rf"\b{re.escape(v)}\b") for v in VALUES["eatType"]},
    "food": {v: re.compile(rf"\b{v}\b") for v in VALUES["food"]},
    "priceRange": {v: re.compile(rf"\b{v}\b") for v in VALUES["priceRange"]},
    "customerRating": {v: re.compile(rf"\b{v}\b") for v in VALUES["customerRating"]},
    "area": {v: re.compile(rf"\b{re.escape(v)}\b") for v in VALUES["area"]},
    # a name that does not follow "near" / "close to" is the restaurant's own name
    "name": {v: re.compile(rf"(?<!near )(?<!close to )\b{re.escape(v)}\b") for v in NAMES},
    "near": {v: re.compile(rf"\b{_NEAR_CUE} {re.escape(v)}\b") for v in VALUES["near"]},
    "familyFriendly": {
        "no": re.compile(r"\bnot (?:family|kid) friendly\b|\bnot welcome children\b"
                         r"|\bchildren are not welcome\b"),
        "yes": re.compile(r"(?<!not )\b(?:family|kid) friendly\b|\bwelcomes children\b"
                          r"|\bchildren are welcome\b"),
    },
}


def find_slot_values(text: str) -> dict[str, set[str]]:
    """Which values of which slots a text mentions: `{"food": {"french"}, ...}`.

    Works on any string (model outputs included): the text is first re-spaced into canonical
    words, then matched against a pattern per slot value.
    """
    canonical = " ".join(split_words(text))
    found: dict[str, set[str]] = {}
    for slot, patterns in _VALUE_PATTERNS.items():
        values = {value for value, pattern in patterns.items() if pattern.search(canonical)}
        if values:
            found[slot] = values
    return found


# ---------------------------------------------------------------------------------------------
# A query language (the target side of the `sql` task)
# ---------------------------------------------------------------------------------------------

# The `sql` task writes a restaurant as a WikiSQL-like query: "select giraffe where food is french
# and near is the eagle". Its two keywords are the only words of the vocabulary that the pretraining
# corpus never writes, so the base model has never produced them.
QUERY_WORDS = ("select", "where")
QUERY_COLUMNS = {"eatType": "place", "food": "food", "priceRange": "price", "customerRating": "rating",
                 "area": "area", "familyFriendly": "family", "near": "near"}


def query(mr: Mapping[str, str]) -> str:
    """The MR as a query: `select <name> where <column> is <value> and ...`, slots in canonical order."""
    mr = validate_mr(mr)
    conditions = " and ".join(f"{QUERY_COLUMNS[slot]} is {value}" for slot, value in mr.items() if slot != "name")
    return f"select {mr['name']} where {conditions}"


# ---------------------------------------------------------------------------------------------
# The world's vocabulary
# ---------------------------------------------------------------------------------------------

def world_words() -> list[str]:
    """Every word the world can write, in a fixed order: slot openers, "]", sorted words, the query keywords."""
    texts: list[str] = []
    for slot, values in VALUES.items():
        texts.extend(_surface(slot, v) for v in values)
    templates = list(INTRO_TEMPLATES) + [t for ts in WHERE_TEMPLATES.values() for t in ts]
    for table in (PREDICATES, SENTENCES):
        templates.extend(t for ts in table.values() for t in ts)
    templates.extend(QUESTIONS.values())
    texts.extend(re.sub(r"\{\w+\}", " ", t) for t in templates)
    texts.extend(ANSWERS)
    texts.extend(("a an place", "and ,"))  # words the code adds around template pieces
    syntax = [SLOT_TOKENS[slot] for slot in SLOTS] + [CLOSE_SLOT]
    words = {w for text in texts for w in split_words(text)} - set(syntax)
    # the query keywords come last, so the corpus's words keep the ids the base model learned them at
    return syntax + sorted(words) + list(QUERY_WORDS)
