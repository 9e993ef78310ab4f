"""The downstream tasks and the pretraining corpus of the restaurant world.

Three tasks stand in for the paper's benchmarks (Hu et al. 2021, Sec. 5), one per kind:

    task       kind                analogue of            prompt x             target y
    e2e        data-to-text        E2E NLG (Sec. 5.5)     MR linearisation     a description
    parse      text-to-structure   WikiSQL (Sec. 5.4)     a description        the MR linearisation
    classify   3-way inference     MNLI (Sec. 5.2/5.4)    description + question   yes / no / maybe
    sql        text-to-query       WikiSQL (Sec. 5.4)     a description        a query (`world.query`)

`e2e`, `parse` and `classify` are the demo's tasks (``DEMO_TASKS``). The pretraining corpus holds
their ingredients (MR strings, descriptions, questions with answers), so the base model already
knows much of them. `sql` is the task it has never seen: its target is a query language with two
keywords ("select", "where") that no pretraining line contains, so its zero-shot score is 0 and
fine-tuning must teach a new output format, as WikiSQL's SQL is new to GPT-3.

`e2e` examples of the val and test splits carry several references (``Example.references``), as
E2E NLG has several human references per MR: the target and ``N_REFERENCES - 1`` other
descriptions of the same restaurant. BLEU and ROUGE-L score against all of them.

`classify` is natural language inference: the premise is a description, the hypothesis is a
question about one slot ("does it serve french food?"), and the label says whether the description
entails it ("yes"), contradicts it ("no") or says nothing about that slot ("maybe" = neutral).
The three labels are drawn with equal probability.

Splits: an MR belongs to train, val or test by a hash of its linearisation (`world.split_of`), so
splits never share a restaurant, within a task or across tasks, and the pretraining corpus only
uses train restaurants. Inside a split an MR appears at most once. Each (task, split) has its own
fixed seed; asking for `n` examples gives the first `n` of one deterministic stream, so a smaller
`n` is always a prefix of a larger one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from hashlib import sha256

from .text import count_words
from .world import (
    ANSWERS,
    MAX_SEQUENCE_TOKENS,
    OPTIONAL_SLOTS,
    VALUES,
    Rng,
    answer,
    describe,
    linearise,
    query,
    question,
    random_mr,
    split_of_linearisation,
)

TASKS = ("e2e", "parse", "classify", "sql")
DEMO_TASKS = ("e2e", "parse", "classify")
N_REFERENCES = 5  # references per e2e val/test MR (E2E NLG: 8.1 on average)
SPLITS = ("train", "val", "test")
SPLIT_SIZES = {"train": 2000, "val": 200, "test": 200}
LABELS = ANSWERS  # classify: ("yes", "no", "maybe") = entailment, contradiction, neutral

# One fixed seed per (task, split): task seed + split offset.
_TASK_SEEDS = {"e2e": 1000, "parse": 2000, "classify": 3000, "sql": 4000}
_SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Example:
    """One (x, y) pair of a task: the model reads `prompt`, then `=>`, and must write `target`.

    `mr` is the restaurant behind the example, as (slot, value) pairs in canonical slot order.
    """

    prompt: str
    target: str
    mr: tuple[tuple[str, str], ...]
    references: tuple[str, ...] = ()  # every acceptable target (e2e val/test: N_REFERENCES); () means (target,)

    @property
    def all_references(self) -> tuple[str, ...]:
        return self.references or (self.target,)

    @property
    def mr_dict(self) -> dict[str, str]:
        return dict(self.mr)

    @property
    def text(self) -> str:
        """The whole sequence as text (without <bos>/<eos>): `prompt => target`."""
        return f"{self.prompt} => {self.target}"


def _check_task_and_split(name: str, split: str) -> None:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are {list(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the splits are {list(SPLITS)}")


def _random_mr_in(split: str, rng: Rng) -> tuple[dict[str, str], str]:
    """Draw restaurants until one belongs to `split`; returns it and its linearisation."""
    while True:
        mr = random_mr(rng)
        key = linearise(mr)
        if split_of_linearisation(key) == split:
            return mr, key


def _classify_question(mr: Mapping[str, str], label: str, rng: Rng) -> str | None:
    """A question about `mr` whose answer is `label`, or None if there is none (e.g. "maybe"
    when every slot is filled)."""
    candidates = []  # (slot, value asked about)
    for slot in OPTIONAL_SLOTS:
        values = ["yes"] if slot == "familyFriendly" else [v for v in VALUES[slot] if v != mr["name"]]
        candidates.extend((slot, v) for v in values if answer(mr, slot, v) == label)
    if not candidates:
        return None
    return question(*rng.choice(candidates))


@lru_cache(maxsize=32)
def _generate(name: str, split: str, n: int) -> tuple[Example, ...]:
    rng = Rng(_TASK_SEEDS[name] + _SPLIT_OFFSETS[split])
    examples: list[Example] = []
    seen: set[str] = set()
    while len(examples) < n:
        label = rng.choice(LABELS) if name == "classify" else None  # drawn first: balanced labels
        while True:
            mr, linearisation = _random_mr_in(split, rng)
            if linearisation in seen:
                continue
            asked = _classify_question(mr, label, rng) if label is not None else None
            if label is None or asked is not None:
                break
        seen.add(linearisation)
        description = describe(mr, rng)
        pairs = tuple(mr.items())
        if name == "e2e":
            references = _other_references(mr, linearisation, description) if split != "train" else ()
            examples.append(Example(prompt=linearisation, target=description, mr=pairs, references=references))
        elif name == "parse":
            examples.append(Example(prompt=description, target=linearisation, mr=pairs))
        elif name == "sql":
            target = query(mr)
            if count_words(description) + count_words(target) > MAX_SEQUENCE_TOKENS - 3:
                continue  # [bos] x => y [eos] must fit the context: draw another restaurant
            examples.append(Example(prompt=description, target=target, mr=pairs))
        else:
            examples.append(Example(prompt=f"{description} {asked}", target=label, mr=pairs))
    return tuple(examples)


def _other_references(mr: Mapping[str, str], linearisation: str, target: str) -> tuple[str, ...]:
    """``target`` and ``N_REFERENCES - 1`` other, distinct descriptions of ``mr`` (when the grammar has them).

    They come from a generator seeded by the MR itself, so the split's own stream (and with it
    every prompt and target) does not depend on how many references there are.
    """
    rng = Rng(int.from_bytes(sha256(linearisation.encode()).digest()[:8], "big"))
    references = [target]
    for _ in range(8 * N_REFERENCES):
        if len(references) == N_REFERENCES:
            break
        text = describe(mr, rng)
        if text not in references:
            references.append(text)
    return tuple(references)


def load_task(name: str, split: str, n: int | None = None) -> list[Example]:
    """The examples of task `name` ("e2e", "parse", "classify", "sql") in `split` ("train", "val", "test").

    `n` defaults to SPLIT_SIZES[split] (2000 / 200 / 200); any `n` gives the first `n` examples
    of the split's fixed stream.
    """
    _check_task_and_split(name, split)
    n = SPLIT_SIZES[split] if n is None else n
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return list(_generate(name, split, n))


def pretrain_corpus(n: int, seed: int = 0) -> list[str]:
    """`n` lines of text for pretraining the base language model, from train restaurants only.

    Like the web text GPT-2 was trained on, the corpus holds the language and loose pairings of
    facts and prose, never the tasks' format: 10 % descriptions, 5 % bare MR linearisations,
    25 % an MR followed by a description of it, 30 % a description followed by its MR, and 30 % a
    description followed by up to three questions, each with its answer word (as many as fit in
    the context). No line contains "=>" (the task separator) and no val/test restaurant appears.
    So the base model already "knows" how facts and descriptions relate, as GPT-2 knows tables and
    text; fine-tuning (full or LoRA) teaches the task: read x, see "=>", write y in the task's
    exact convention.

    The pairings dominate because they are what a tiny model learns slowly: which name a "the"
    belongs to, whether the word a question asks about is in the text. Bare descriptions teach
    the language, but not those (README, "The shipped base model").
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = Rng(seed)
    lines = []
    for _ in range(n):
        mr, linearisation = _pretraining_restaurant(rng)
        kind = rng.below(20)
        if kind < 2:
            lines.append(describe(mr, rng))
        elif kind < 3:
            lines.append(linearisation)
        elif kind < 8:
            lines.append(f"{linearisation} {describe(mr, rng)}")
        elif kind < 14:
            lines.append(f"{describe(mr, rng)} {linearisation}")
        else:
            lines.append(_questions_and_answers(mr, describe(mr, rng), rng))
    return lines


SHARED_WORD_NAMES = ("the eagle", "the mill")


def _pretraining_restaurant(rng: Rng) -> tuple[dict[str, str], str]:
    """A train restaurant for the corpus; 6 lines in 10 are about one named or near "the eagle"
    or "the mill".

    Those two are the only names that share a word, so telling them apart takes a copy of the
    word after "the" (all other names differ in their first word). Drawn uniformly, they are too
    rare a lesson for the tiny model: the two token vectors merge and it writes either at random
    (see ``minilora.recipes.pretrain``); upsampling them, like upsampling a hard domain in a web
    corpus, changes how often the model sees them, not the language.
    """
    wanted = rng.chance(0.6)
    while True:
        mr, linearisation = _random_mr_in("train", rng)
        if not wanted or mr["name"] in SHARED_WORD_NAMES or mr.get("near") in SHARED_WORD_NAMES:
            return mr, linearisation


def _questions_and_answers(mr: Mapping[str, str], line: str, rng: Rng, n_questions: int = 3) -> str:
    """`line` followed by up to `n_questions` "question answer" pairs about `mr`, while the whole
    stays within the context ([bos] and [eos] included). The labels are drawn uniformly, as in
    the classify task; a label with no question (e.g. "maybe" when every slot is filled) is skipped."""
    for _ in range(n_questions):
        label = rng.choice(LABELS)
        asked = _classify_question(mr, label, rng)
        if asked is None:
            continue
        longer = f"{line} {asked} {label}"
        if count_words(longer) > MAX_SEQUENCE_TOKENS - 2:
            break
        line = longer
    return line
