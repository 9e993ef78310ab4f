"""Specs for minilora.data: the restaurant world, its tokenizer, tasks, batching and metrics."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.data import (
    LABELS,
    MAX_SEQUENCE_TOKENS,
    N_REFERENCES,
    SLOTS,
    SPLITS,
    TASKS,
    VALUES,
    VOCAB_SIZE,
    Example,
    Rng,
    Tokenizer,
    accuracy,
    bleu,
    collate,
    describe,
    encode_example,
    exact_match,
    find_slot_values,
    linearise,
    lm_collate,
    load_task,
    parse_mr,
    pretrain_corpus,
    prompt_ids,
    query,
    random_mr,
    rouge_l,
    slot_error_rate,
    slot_errors,
    split_of,
    task_metric,
    text_metrics,
)
from minilora.data import tasks as tasks_module
from minilora.data.world import AREA_PHRASES, QUERY_WORDS

TOK = Tokenizer.default()


def all_examples():
    return [(task, split, load_task(task, split)) for task in TASKS for split in SPLITS]


@st.composite
def mrs(draw):
    """A valid restaurant: a name and 2..7 other slots, drawn slot by slot (shrinks nicely)."""
    name = draw(st.sampled_from(VALUES["name"]))
    optional = draw(st.lists(st.sampled_from(SLOTS[1:]), min_size=2, max_size=7, unique=True))
    mr = {"name": name}
    for slot in SLOTS[1:]:
        if slot in optional:
            mr[slot] = draw(st.sampled_from([v for v in VALUES[slot] if v != name]))
    return mr


# --- tokenizer -------------------------------------------------------------------------------

def test_vocabulary_is_closed_small_and_deterministic():
    assert VOCAB_SIZE == 96
    assert TOK.vocab_size <= VOCAB_SIZE
    assert Tokenizer(TOK.id_to_token).id_to_token == TOK.id_to_token
    assert TOK.id_to_token[:4] == ("<pad>", "<bos>", "<eos>", "=>")
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.sep_id) == (0, 1, 2, 3)
    assert all(TOK.token_to_id[t] == i for i, t in enumerate(TOK.id_to_token))
    assert "food[" in TOK.token_to_id and "]" in TOK.token_to_id  # slot names are tokens


@pytest.mark.parametrize("task,split", [(t, s) for t in TASKS for s in SPLITS])
def test_round_trip_and_length_on_every_split(task, split):
    for example in load_task(task, split):
        for text in (example.prompt, example.target):
            assert TOK.decode(TOK.encode(text)) == text
        ids, n_prompt = encode_example(TOK, example)
        assert len(ids) <= MAX_SEQUENCE_TOKENS == 64, example
        assert TOK.decode(ids) == f"<bos> {example.prompt} => {example.target} <eos>"
        assert ids[:n_prompt] == prompt_ids(TOK, example.prompt)


def test_round_trip_on_pretraining_corpus():
    for line in pretrain_corpus(300, seed=0):
        ids = TOK.encode(line)
        assert TOK.decode(ids) == line
        assert len(ids) + 2 <= MAX_SEQUENCE_TOKENS


def test_encode_is_case_and_spacing_tolerant():
    assert TOK.encode("The Eagle, a PUB.") == TOK.encode("the eagle, a pub.")
    assert TOK.encode("name [ the eagle ] food [french]") == TOK.encode("name[the eagle] food[french]")
    assert TOK.decode(TOK.encode("name [ the eagle ]")) == "name[the eagle]"


def test_unknown_word_names_word_position_and_closed_vocabulary():
    with pytest.raises(ValueError, match=r"'chineese' at position 3.*closed.*'chinese'"):
        TOK.encode("the eagle serves chineese food.")
    with pytest.raises(ValueError, match=r"'xyzzy' at position 0.*vocabulary is closed"):
        TOK.encode("xyzzy")


def test_decode_special_and_out_of_range_ids():
    ids = [TOK.bos_id] + TOK.encode("the eagle is a pub.") + [TOK.eos_id, TOK.pad_id]
    assert TOK.decode(ids, skip_special=True) == "the eagle is a pub."
    assert TOK.decode(np.array(ids[:3])) == "<bos> the eagle"
    assert TOK.decode([VOCAB_SIZE - 1]) == "<unused>"  # padding rows of the embedding
    with pytest.raises(ValueError, match="out of range"):
        TOK.decode([VOCAB_SIZE])


# --- the world -------------------------------------------------------------------------------

@settings(deadline=None)
@given(mr=mrs(), seed=st.integers(0, 2**32 - 1))
def test_description_realises_every_slot_exactly_once(mr, seed):
    text = describe(mr, Rng(seed))
    assert TOK.decode(TOK.encode(text)) == text
    assert len(TOK.encode(linearise(mr))) + len(TOK.encode(text)) + 3 <= MAX_SEQUENCE_TOKENS
    assert slot_errors(text, mr) == (0, 0), text
    assert all(find_slot_values(text)[slot] == {value} for slot, value in mr.items()), text
    for slot, value in mr.items():
        if slot != "familyFriendly":
            surface = AREA_PHRASES[value] if slot == "area" else value
            assert len(re.findall(rf"\b{surface}\b", text)) == 1, (slot, text)


@settings(deadline=None)
@given(mr=mrs())
def test_linearisation_round_trips(mr):
    text = linearise(mr)
    assert parse_mr(text) == mr
    assert TOK.decode(TOK.encode(text)) == text
    assert list(parse_mr(text)) == [s for s in SLOTS if s in mr]  # canonical slot order


@settings(deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_restaurants_are_valid(seed):
    rng = Rng(seed)
    mr = random_mr(rng)
    assert mr["name"] in VALUES["name"] and 3 <= len(mr) <= 8
    assert mr.get("near") != mr["name"]
    text = describe(mr, rng)
    assert TOK.decode(TOK.encode(text)) == text and slot_error_rate([text], [mr]) == 0.0
    assert split_of(mr) in SPLITS


def test_invalid_mr_is_refused():
    with pytest.raises(ValueError, match="unknown slot"):
        linearise({"name": "zizzi", "colour": "red"})
    with pytest.raises(ValueError, match="food takes one of"):
        linearise({"name": "zizzi", "food": "pizza"})
    with pytest.raises(ValueError, match="near itself"):
        linearise({"name": "zizzi", "near": "zizzi"})


# --- tasks and splits ------------------------------------------------------------------------

def test_split_sizes_and_prefixes():
    for task in TASKS:
        assert len(load_task(task, "train")) == 2000
        assert len(load_task(task, "val")) == len(load_task(task, "test")) == 200
        assert load_task(task, "val", n=20) == load_task(task, "val")[:20]
        assert load_task(task, "test", n=0) == []


def test_splits_are_deterministic():
    for task in TASKS:
        fresh = tasks_module._generate.__wrapped__(task, "train", 30)  # bypass the cache
        assert list(fresh) == load_task(task, "train", n=30)
    assert pretrain_corpus(50, seed=3) == pretrain_corpus(50, seed=3)
    assert pretrain_corpus(50, seed=3) != pretrain_corpus(50, seed=4)


def test_splits_are_disjoint_within_and_across_tasks():
    mrs_by_split = {split: set() for split in SPLITS}
    for task, split, examples in all_examples():
        keys = [linearise(e.mr_dict) for e in examples]
        assert len(set(keys)) == len(keys), f"{task}/{split} repeats an MR"
        assert all(split_of(e.mr_dict) == split for e in examples)
        mrs_by_split[split].update(keys)
    assert not mrs_by_split["train"] & mrs_by_split["val"]
    assert not mrs_by_split["train"] & mrs_by_split["test"]
    assert not mrs_by_split["val"] & mrs_by_split["test"]


def test_pretraining_never_sees_the_task_format_or_held_out_restaurants():
    corpus = pretrain_corpus(500, seed=0)
    held_out = {text for _, split, examples in all_examples() if split != "train"
                for e in examples for text in (e.prompt, e.target)}
    assert not set(corpus) & held_out
    assert not any("=>" in line for line in corpus)
    for line in corpus:  # every restaurant named in the corpus is a train restaurant
        mr = parse_mr(line)
        if "name" in mr and len(mr) > 1:
            assert split_of(mr) == "train", line
    linearisations = [line for line in corpus if line.startswith("name[")]
    assert len(linearisations) > 100  # the MR syntax, alone or next to a description
    answered = [line for line in corpus if line.split()[-1] in LABELS]
    assert 120 < len(answered) < 180  # 30 % of the lines: questions with answers, like web Q&A text


def test_task_formats():
    e2e, parse, classify, sql = (load_task(task, "val", n=5) for task in TASKS)
    assert all(parse_mr(e.prompt) == e.mr_dict and e.target.endswith(".") for e in e2e)
    assert all(e.target == linearise(e.mr_dict) for e in parse)
    assert all(e.prompt.endswith("?") and e.target in LABELS for e in classify)
    assert all(e.target == query(e.mr_dict) and e.target.startswith(f"select {e.mr_dict['name']} where ")
               for e in sql)
    assert isinstance(e2e[0], Example) and hash(e2e[0]) == hash(load_task("e2e", "val", n=1)[0])


def test_the_query_language():
    mr = {"name": "the eagle", "eatType": "pub", "area": "city centre", "familyFriendly": "no", "near": "avalon"}
    assert query(mr) == ("select the eagle where place is pub and area is city centre and family is no "
                         "and near is avalon")
    assert TOK.decode(TOK.encode(query(mr))) == query(mr)


def test_the_pretraining_corpus_never_writes_the_query_keywords():
    """sql is the task the base has never seen: its keywords are in no pretraining line, and they
    come last in the vocabulary, after every word the corpus uses."""
    corpus_words = {w for line in pretrain_corpus(2000, seed=3) for w in line.split()}
    assert not corpus_words & set(QUERY_WORDS)
    assert TOK.id_to_token[-len(QUERY_WORDS):] == QUERY_WORDS
    assert all(w in TOK.token_to_id for e in load_task("sql", "train", 50) for w in e.target.split())


def test_sql_examples_fit_the_context():
    lengths = [len(encode_example(TOK, e)[0]) for split in SPLITS for e in load_task("sql", split)]
    assert max(lengths) <= MAX_SEQUENCE_TOKENS


def test_e2e_val_and_test_examples_carry_several_references():
    for split in ("val", "test"):
        for e in load_task("e2e", split, 50):
            refs = e.all_references
            assert refs[0] == e.target and len(set(refs)) == len(refs) >= 2
            assert len(refs) <= N_REFERENCES
            assert all(find_slot_values(r) and parse_mr(e.prompt) == e.mr_dict for r in refs)
            assert all(slot_errors(r, e.mr) == (0, 0) for r in refs)  # each is a full description of the MR
    assert all(len(e.all_references) == 1 for e in load_task("e2e", "train", 20))
    assert np.mean([len(e.all_references) for e in load_task("e2e", "test")]) > N_REFERENCES - 1


def test_bleu_and_rouge_l_score_against_every_reference():
    test = load_task("e2e", "test", 30)
    second = [e.all_references[1] for e in test]  # right, but not the first reference
    assert bleu(second, test) == pytest.approx(1.0) and rouge_l(second, test) == pytest.approx(1.0)
    only_first = [Example(e.prompt, e.target, e.mr) for e in test]
    assert bleu(second, only_first) < 0.9 and rouge_l(second, only_first) < 0.95
    wrong = ["there is a pub."] * len(test)
    scores = text_metrics(wrong, test)
    assert 0.0 <= scores["bleu"] < 0.05 and 0.0 < scores["rouge_l"] < 0.4
    with pytest.raises(ValueError, match="2 predictions but 30 references"):
        bleu(["a", "b"], test)


def test_classify_labels_are_balanced_and_correct():
    train = load_task("classify", "train")
    for label in LABELS:
        assert sum(e.target == label for e in train) / len(train) >= 0.15, label
    example = next(e for e in train if "does it serve" in e.prompt)
    food = re.search(r"does it serve (\w+) food\?", example.prompt).group(1)
    mr = example.mr_dict
    expected = "maybe" if "food" not in mr else "yes" if mr["food"] == food else "no"
    assert example.target == expected


def test_unknown_task_or_split_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task 'mnli'.*'e2e', 'parse', 'classify'"):
        load_task("mnli", "train")
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*'train', 'val', 'test'"):
        load_task("e2e", "dev")


# --- batching --------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_collate_masks_exactly_the_y_tokens(task):
    examples = load_task(task, "val", n=6)
    batch = collate(examples, TOK)
    lengths = [len(encode_example(TOK, e)[0]) for e in examples]
    B, T = batch.idx.shape
    assert (B, T) == (6, max(lengths) - 1)
    assert batch.targets.shape == batch.mask.shape == (B, T)
    assert batch.idx.dtype == batch.targets.dtype == np.int64 and batch.mask.dtype == np.float32
    np.testing.assert_array_equal(batch.idx[:, 1:], batch.targets[:, :-1])  # shifted by one
    for b, example in enumerate(examples):
        ids, n_prompt = encode_example(TOK, example)
        on = batch.mask[b] == 1.0
        assert set(np.unique(batch.mask[b])) <= {0.0, 1.0}
        assert TOK.decode(batch.targets[b][on]) == f"{example.target} <eos>"
        assert TOK.decode(batch.targets[b][: n_prompt - 1]) == f"{example.prompt} =>"
        assert not on[: n_prompt - 1].any() and not on[len(ids) - 1:].any()
        assert (batch.idx[b, len(ids):] == TOK.pad_id).all()
        assert (batch.targets[b, len(ids) - 1:] == TOK.pad_id).all()
        assert batch.idx[b, 0] == TOK.bos_id
    assert batch.n_tokens == sum(len(TOK.encode(e.target)) + 1 for e in examples)


def test_collate_pad_to_block_and_too_long():
    examples = load_task("classify", "test", n=3)
    batch = collate(examples, TOK, block_size=64, pad_to_block=True)
    assert batch.idx.shape == (3, 63)
    with pytest.raises(ValueError, match="more than block_size=8"):
        collate(examples, TOK, block_size=8)
    with pytest.raises(ValueError, match="empty"):
        collate([], TOK)


def test_lm_collate_counts_every_real_token():
    texts = ["the eagle is a pub.", "name[zizzi] food[french]"]
    batch = lm_collate(texts, TOK, block_size=64)
    assert batch.idx.shape == (2, len(TOK.encode(texts[0])) + 1)
    assert batch.mask.sum(axis=1).tolist() == [len(TOK.encode(t)) + 1 for t in texts]
    assert TOK.decode(batch.targets[1][batch.mask[1] == 1]) == "name[zizzi] food[french] <eos>"
    assert lm_collate(texts, TOK, pad_to_block=True).idx.shape == (2, 63)


# --- metrics ---------------------------------------------------------------------------------

MR4 = {"name": "the eagle", "eatType": "pub", "food": "french", "area": "riverside"}


@pytest.mark.parametrize("text,errors", [
    ("the eagle is a french pub in the riverside area.", (0, 0)),
    ("the eagle is a pub in the riverside area.", (1, 0)),                         # food missing
    ("the eagle is an italian pub in the riverside area.", (1, 0)),                # wrong = missing
    ("the eagle is a french pub in the riverside area. prices are cheap.", (0, 1)),  # hallucinated
    ("the eagle is a french pub near the mill in the city centre.", (1, 1)),
    ("zizzi is a french pub near the eagle in the riverside area.", (1, 1)),       # names swapped
])
def test_slot_errors_on_hand_made_texts(text, errors):
    assert slot_errors(text, MR4) == errors


def test_slot_error_rate_values():
    assert slot_error_rate(["the eagle is a pub in the riverside area."], [MR4]) == 0.25
    mr2 = {"name": "aromi", "familyFriendly": "no"}
    texts = ["the eagle is a pub in the riverside area.", "aromi is not kid friendly."]
    assert slot_error_rate(texts, [MR4, tuple(mr2.items())]) == pytest.approx(1 / 6)
    assert slot_error_rate(["aromi is family friendly."], [mr2]) == 0.5  # negation matters
    assert slot_error_rate(["children are not welcome at aromi."], [mr2]) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1"):
        slot_error_rate(["a", "b"], [MR4])


def test_exact_match_and_accuracy():
    assert exact_match(["Name[the eagle] ", "name[zizzi]"], ["name[the eagle]", "name[aromi]"]) == 0.5
    assert accuracy(["yes", "no", "maybe", "no"], ["yes", "no", "maybe", "yes"]) == 0.75
    assert accuracy([1, 2], [1, 3]) == 0.5


def test_task_metric_names_and_ranges():
    for task, name in zip(TASKS, ("slot_accuracy", "exact_match", "accuracy", "exact_match")):
        examples = load_task(task, "val", n=20)
        assert task_metric(task, [e.target for e in examples], examples) == (name, 1.0)
    examples = load_task("classify", "val", n=4)
    preds = [e.target for e in examples[:3]] + [next(label for label in LABELS if label != examples[3].target)]
    assert task_metric("classify", preds, examples) == ("accuracy", 0.75)
    chatty = [Example("name[aromi]", "", (("name", "aromi"),))]
    assert task_metric("e2e", ["aromi is a cheap french pub in the city centre."], chatty) == (
        "slot_accuracy", 0.0)  # SER 4.0 is clipped
    with pytest.raises(ValueError, match="unknown task"):
        task_metric("mnli", [], [])


def test_parse_mr_is_tolerant():
    assert parse_mr("name[the eagle] food[french") == {"name": "the eagle", "food": "french"}
    assert parse_mr("so name[zizzi] bogus[x] area[] ]") == {"name": "zizzi"}
    assert parse_mr("name [ the eagle ] near[aromi] near[zizzi]") == {"name": "the eagle", "near": "aromi"}
    assert parse_mr("food[pizza] name[") == {"food": "pizza"}
    assert parse_mr("") == {}


def test_pretraining_questions_are_answered_right_and_fit_the_context():
    """Every "question answer" pair of the corpus is what the classify task would label it, given
    the description in front of it; lines carry several pairs (the dense classify signal)."""
    from minilora.data.world import OPTIONAL_SLOTS, VALUES, question

    asked_about = {question(slot, v): (slot, v) for slot in OPTIONAL_SLOTS
                   for v in (["yes"] if slot == "familyFriendly" else VALUES[slot])}
    pair = re.compile(r"((?:is|does) it [^?]*\?) (yes|no|maybe)")
    counts = []
    for line in pretrain_corpus(2000, seed=5):
        assert len(TOK.encode(line)) + 2 <= MAX_SEQUENCE_TOKENS
        pairs = pair.findall(line)
        if not pairs:
            continue
        description = line[:line.index(pairs[0][0])].strip()
        found = find_slot_values(description)
        for asked, label in pairs:
            slot, value = asked_about[asked]
            expected = "maybe" if slot not in found else "yes" if value in found[slot] else "no"
            assert label == expected, (line, asked)
        counts.append(len(pairs))
    assert 0.25 * 2000 < len(counts) < 0.35 * 2000  # 30 % of the lines
    assert np.mean(counts) > 1.8 and max(counts) == 3
