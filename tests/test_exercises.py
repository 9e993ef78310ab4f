"""Every exercise check of ``minilora.exercises``: a right answer passes, a wrong one fails helpfully.

A wrong answer must raise ExerciseError (an AssertionError) whose message diagnoses what differs
and gives a hint; the formula only at hint_level=2. A function that still raises
NotImplementedError (an exercise not tried yet) makes the check print a reminder and return None,
so the tutorials run before the exercises are done. Every registered solution passes its check,
and no solution sits in a tutorial.
"""

import glob
import os
import re


import numpy as np
import pytest

import minilora as ml
from minilora import backend as bk
from minilora import exercises as ex
from minilora import functional as F


def _fails(check, answer, *fragments, hint_level=1):
    with pytest.raises(ex.ExerciseError) as info:
        check(answer, hint_level=hint_level)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "Hint" in message or "hint" in message or "use " in message or "return " in message, message
    assert not re.search(r"np\.float(32|64)\(-?\d", message), message  # plain numbers, not np.float64(0.25…)
    assert "input 0" not in message, message  # parameters by name
    return message


# ----------------------------------------------------------------------------- 01
def test_backward_by_hand():
    def right(x, w):
        a = np.tanh(x)
        dh = 2 * a @ w
        return (dh @ w.T) * (1 - a * a), a.T @ dh

    def forgets_tanh_derivative(x, w):
        a = np.tanh(x)
        dh = 2 * a @ w
        return dh @ w.T, a.T @ dh

    assert ex.check_backward_by_hand(right) is True
    message = _fails(ex.check_backward_by_hand, forgets_tanh_derivative, "dx", "dw is right", "through tanh")
    assert "(1 − a²)" not in message  # the formula only on request
    _fails(ex.check_backward_by_hand, forgets_tanh_derivative, "dx", "(1 − a²)", hint_level=2)


def test_backward_by_hand_wrong_shape_and_none():
    _fails(ex.check_backward_by_hand, lambda x, w: (x, w.T), "shape")
    with pytest.raises(ex.ExerciseError, match="two arrays"):
        ex.check_backward_by_hand(lambda x, w: None)


class _Sigmoid(ml.Function):
    def forward(self, x):
        y = 1.0 / (1.0 + np.exp(-x))
        self.save_for_backward(y)
        return y

    def backward(self, grad):
        (y,) = self.saved
        return grad * y * (1.0 - y)


class _SigmoidForgetsOneMinus(_Sigmoid):
    def backward(self, grad):
        (y,) = self.saved
        return grad * y


def test_sigmoid():
    assert ex.check_sigmoid(_Sigmoid) is True
    message = _fails(ex.check_sigmoid, _SigmoidForgetsOneMinus, "backward is wrong", "for x (shape (3, 5))")
    assert "central differences" in message  # gradcheck's own words are passed on
    assert "y (1 − y)" not in message
    _fails(ex.check_sigmoid, _SigmoidForgetsOneMinus, "backward is wrong", "for x", "y (1 − y)", hint_level=2)
    with pytest.raises(ex.ExerciseError, match="Function subclass"):
        ex.check_sigmoid(lambda x: x)


def test_not_attempted_returns_none_and_says_so(capsys):
    def stub(x, w):
        raise NotImplementedError

    assert ex.check_backward_by_hand(stub) is None
    assert "not attempted yet" in capsys.readouterr().out

    class Stub(ml.Function):
        def forward(self, x):
            raise NotImplementedError

    assert ex.check_sigmoid(Stub) is None


# ----------------------------------------------------------------------------- 02
def right_dA(x, lora_A, lora_B, grad_h, scaling):
    return scaling * (grad_h @ lora_B).T @ x


def right_dB(x, lora_A, lora_B, grad_h, scaling):
    return scaling * grad_h.T @ (x @ lora_A.T)


def test_dA():
    assert ex.check_dA(right_dA) is True
    _fails(ex.check_dA, lambda x, A, Bm, g, s: (g @ Bm).T @ x, "dA", "scaling s = 2.5")  # forgot s
    _fails(ex.check_dA, lambda x, A, Bm, g, s: s * x.T @ (g @ Bm), "shape")  # transposed


def test_dB():
    assert ex.check_dB(right_dB) is True
    _fails(ex.check_dB, lambda x, A, Bm, g, s: s * g.T @ x @ A.T @ A @ A.T, "dB")


def test_dB_rejects_dA_formula():
    with pytest.raises(ex.ExerciseError):
        ex.check_dB(right_dA)


def test_lora_param_count():
    assert ex.check_lora_param_count(lambda d, k, r, n: n * r * (d + k)) is True
    _fails(ex.check_lora_param_count, lambda d, k, r, n: 2 * n * d * r, "not square")
    message = _fails(ex.check_lora_param_count, lambda d, k, r, n: n * d * k, "full fine-tuning")
    assert "8,192" not in message and "the answer is" not in message  # a wrong attempt never gets the answer


@pytest.mark.parametrize("wrong, fragment", [
    (lambda d, k, r, n: n * d * r, "one factor alone"),
    (lambda d, k, r, n: n * r * k, "one factor alone"),
    (lambda d, k, r, n: r * (d + k), "one matrix"),
    (lambda d, k, r, n: n * r * (d + k) + 1, "more than LoRA trains"),
])
def test_lora_param_count_diagnoses_without_the_answer(wrong, fragment):
    message = _fails(ex.check_lora_param_count, wrong, fragment)
    first_case = 1 * 4 * (1024 + 1024)  # the right count of the first case the check tries
    assert f"{first_case:,}" not in message and str(first_case) not in message


# ----------------------------------------------------------------------------- 03
def test_loss_mask():
    def right(n_prompt, n_tokens, width):
        mask = np.zeros(width)
        mask[n_prompt - 1:n_tokens - 1] = 1.0
        return mask

    def off_by_one(n_prompt, n_tokens, width):
        mask = np.zeros(width)
        mask[n_prompt:n_tokens] = 1.0
        return mask

    assert ex.check_loss_mask(right) is True
    _fails(ex.check_loss_mask, off_by_one, "row 0", "seq[t + 1]", "shifted by +1")
    _fails(ex.check_loss_mask, lambda n_prompt, n_tokens, width: np.ones(width + 1), "shape")


def test_masked_loss():
    def right(logits, targets, mask):
        logp = F.log_softmax(logits, axis=-1)
        onehot = np.eye(logits.shape[-1])[targets] * mask[..., None]
        return -(logp * ml.tensor(onehot, dtype=logits.dtype)).sum() / float(mask.sum())

    def ignores_mask(logits, targets, mask):
        logp = F.log_softmax(logits, axis=-1)
        onehot = np.eye(logits.shape[-1])[targets]
        return -(logp * ml.tensor(onehot, dtype=logits.dtype)).sum() / float(targets.size)

    def detached(logits, targets, mask):
        return F.cross_entropy(logits.detach(), targets, mask=mask)

    assert ex.check_masked_loss(right) is True
    _fails(ex.check_masked_loss, ignores_mask, "loss value", "every position", "mask = 1")
    _fails(ex.check_masked_loss, ignores_mask, "loss value", "mask.sum()", hint_level=2)
    with pytest.raises(ex.ExerciseError, match="does not require grad"):
        ex.check_masked_loss(detached)
    with pytest.raises(ex.ExerciseError, match="Tensor"):
        ex.check_masked_loss(lambda logits, targets, mask: 1.0)


# ----------------------------------------------------------------------------- 04
def test_optimizer_state_bytes():
    assert ex.check_optimizer_state_bytes(lambda n, size: 2 * n * size) is True
    message = _fails(ex.check_optimizer_state_bytes, lambda n, size: n * size, "than AdamW holds", "0.5×")
    assert "two running averages" not in message
    _fails(ex.check_optimizer_state_bytes, lambda n, size: n * size, "than AdamW holds", "two running averages",
           hint_level=2)
    _fails(ex.check_optimizer_state_bytes, lambda n, size: 2 * n * 4, "float64")


def test_trainable_params():
    sizes = {"q": (1, 1), "k": (1, 1), "v": (1, 1), "o": (1, 1), "fc": (4, 1), "proj": (1, 4)}

    def right(cfg, r, targets):
        d = cfg.d_model
        return cfg.n_layer * sum(r * (sizes[t][0] * d + sizes[t][1] * d) for t in targets)

    assert ex.check_trainable_params(right) is True
    _fails(ex.check_trainable_params, lambda cfg, r, targets: 2 * cfg.n_layer * cfg.d_model * r * len(targets),
           "fc", "4·d_model")


# ----------------------------------------------------------------------------- 05
def test_merge():
    assert ex.check_merge(lambda W0, A, Bm, s: W0 + s * Bm @ A) is True
    _fails(ex.check_merge, lambda W0, A, Bm, s: W0 + Bm @ A, "F.lora_linear", "scaling")
    _fails(ex.check_merge, lambda W0, A, Bm, s: W0 + s * A.T @ Bm.T, "shape")


def test_switch():
    def right(W, old, new):
        (A1, B1, s1), (A2, B2, s2) = old, new
        return W - s1 * B1 @ A1 + s2 * B2 @ A2

    def one_scaling(W, old, new):
        (A1, B1, s1), (A2, B2, _) = old, new
        return W - s1 * B1 @ A1 + s1 * B2 @ A2

    assert ex.check_switch(right) is True
    _fails(ex.check_switch, one_scaling, "switched weight", "its own scaling")


@pytest.mark.parametrize("wrong, fragment", [
    (lambda W, old, new: W + old[2] * old[1] @ old[0] + new[2] * new[1] @ new[0], "a sign error"),
    (lambda W, old, new: W + new[2] * new[1] @ new[0], "still in"),
    (lambda W, old, new: W - old[2] * old[1] @ old[0] - new[2] * new[1] @ new[0], "wrong sign"),
    (lambda W, old, new: W - old[1] @ old[0] + new[2] * new[1] @ new[0], "factor −1/s"),
    (lambda W, old, new: W - old[2] * old[1] @ old[0], "update is missing"),
])
def test_switch_diagnoses_signs_and_scalings(wrong, fragment):
    message = _fails(ex.check_switch, wrong, "switched weight", fragment)
    assert "minilora gives" not in message  # a diagnosis, not an entry-by-entry comparison


def test_mixed_batch():
    def right(x, W0, bias, adapters, adapter_ids):
        h = x @ W0.T + bias
        for i, name in enumerate(adapter_ids):
            if name in adapters:
                A, Bm, s = adapters[name]
                h[i] += s * (x[i] @ A.T) @ Bm.T
        return h

    def first_adapter_for_all(x, W0, bias, adapters, adapter_ids):
        A, Bm, s = adapters["e2e"]
        return x @ W0.T + bias + s * (x @ A.T) @ Bm.T

    assert ex.check_mixed_batch(right) is True
    _fails(ex.check_mixed_batch, first_adapter_for_all, "adapter_ids", "__base__")


# ----------------------------------------------------------------------------- 06
def test_subspace_similarity():
    def right(A1, A2, i, j):
        v1 = np.linalg.svd(A1, full_matrices=False)[2][:i]
        v2 = np.linalg.svd(A2, full_matrices=False)[2][:j]
        return float(np.sum((v1 @ v2.T) ** 2) / min(i, j))

    def no_division(A1, A2, i, j):
        return right(A1, A2, i, j) * min(i, j)

    assert ex.check_subspace_similarity(right) is True
    _fails(ex.check_subspace_similarity, no_division, "i=2, j=5", "RIGHT")
    with pytest.raises(ex.ExerciseError, match="number"):
        ex.check_subspace_similarity(lambda A1, A2, i, j: "high")


def test_random_subspace_baseline():
    assert ex.check_random_subspace_baseline(lambda i, j, k: max(i, j) / k) is True
    _fails(ex.check_random_subspace_baseline, lambda i, j, k: min(i, j) / k, "i=8, j=64", "min(i, j)")


# ----------------------------------------------------------------------------- 07
def test_softmax_any_backend():
    def right(a):
        xp = bk.get_array_module(a)
        e = xp.exp(a - a.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def unstable(a):
        e = np.exp(a)
        return e / e.sum(axis=-1, keepdims=True)

    def upcasts(a):
        return right(a) * np.float64(1.0)

    assert ex.check_softmax_any_backend(right) is True
    with np.errstate(over="ignore", invalid="ignore"):
        _fails(ex.check_softmax_any_backend, unstable, "NaN or inf", "max")
    _fails(ex.check_softmax_any_backend, upcasts, "float32 input came back as float64")
    _fails(ex.check_softmax_any_backend, lambda a: a.tolist(), "list")


def test_host_logits():
    def right(model, idx):
        with ml.no_grad():
            return bk.to_numpy(model(idx))

    assert ex.check_host_logits(right) is True
    _fails(ex.check_host_logits, lambda model, idx: model(idx), "Tensor", "to_numpy")


# ----------------------------------------------------------------------------- helpers
def test_output_dir_and_save_figure(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    monkeypatch.setenv("MINILORA_OUT", str(tmp_path / "figs"))
    assert ex.output_dir() == str(tmp_path / "figs")
    fig = Figure()
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    path = ex.save_figure(fig, "x.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_crash_in_the_students_code_is_reported():
    with pytest.raises(ex.ExerciseError, match="ZeroDivisionError"):
        ex.check_lora_param_count(lambda d, k, r, n: 1 / 0)


def test_a_crash_names_the_line_and_the_arguments():
    def crashes(d, k, r, n_matrices):
        return d / 0

    _fails(ex.check_lora_param_count, crashes, "ZeroDivisionError", "line", "return d / 0", "d = a int")


# ----------------------------------------------------------------------------- graduated hints
def test_hints_graduate_from_diagnosis_to_formula():
    def forgot_scaling(x, lora_A, lora_B, grad_h, scaling):
        return (grad_h @ lora_B).T @ x

    level0 = _fails(ex.check_dA, forgot_scaling, "0.4× the right one", "drop the scaling s", hint_level=0)
    assert "Hint: " not in level0 and "Formula" not in level0
    level1 = _fails(ex.check_dA, forgot_scaling, "0.4× the right one", "Hint: A is reached only through u")
    assert "Formula" not in level1 and "(grad_h B)ᵀ x" not in level1 and "show_hint('02.1', 2)" in level1
    level2 = _fails(ex.check_dA, forgot_scaling, "Formula:", "s·(grad_h B)ᵀ x", "show_solution('02.1')", hint_level=2)
    assert len(level0) < len(level1) < len(level2)


def test_scaling_applied_twice_is_named():
    _fails(ex.check_dB, lambda x, A, Bm, g, s: s * s * g.T @ (x @ A.T), "2.5× the right one", "scaling s twice")


def test_a_key_error_gets_a_hint_about_the_key_not_the_shapes():
    def looks_up_every_row(x, W0, bias, adapters, adapter_ids):
        h = x @ W0.T + bias
        for i, name in enumerate(adapter_ids):
            A, Bm, s = adapters[name]
            h[i] += s * (x[i] @ A.T) @ Bm.T
        return h

    message = _fails(ex.check_mixed_batch, looks_up_every_row, "KeyError('__base__')", "is not an adapter",
                     "adapters[name]")
    assert "shape" not in message


def test_a_shape_error_names_every_argument():
    message = _fails(ex.check_dA, lambda x, lora_A, lora_B, grad_h, scaling: x @ lora_B, "shape mismatch",
                     "x = a numpy array of shape (5, 6)", "lora_B = a numpy array of shape (4, 3)")
    assert "input 0" not in message


@pytest.mark.parametrize("exercise", ex.exercises(), ids=lambda e: e.id)
def test_every_solution_passes_its_check(exercise, capsys):
    check = getattr(ex, exercise.check)
    assert check(ex.solution(exercise.id)) is True
    assert "✓" in capsys.readouterr().out
    first, formula = exercise.hints
    assert first and formula and first != formula


def test_show_hint_then_formula_then_solution(capsys):
    ex.show_hint("05.2", 1)
    out = capsys.readouterr().out
    assert "Hint:" in out and "Formula:" not in out
    ex.show_hint("05.2", 2)
    out = capsys.readouterr().out
    assert "Formula:" in out and "s′·B′ A′" in out
    source = ex.show_solution("05.2")
    assert "def solution_switch" in capsys.readouterr().out and "def solution_switch" in source
    with pytest.raises(KeyError, match="02.1"):
        ex.show_hint("99.9")


def test_every_exercise_of_every_tutorial_is_registered_and_no_solution_is_in_a_tutorial():
    tutorials = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tutorials")
    ids = {e.id for e in ex.exercises()}
    for path in sorted(glob.glob(os.path.join(tutorials, "[0-9][0-9]_*.py"))):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        number = os.path.basename(path)[:2]
        n_exercises = len(re.findall(r"\*\*Exercise \d", text))
        assert {f"{number}.{i}" for i in range(1, n_exercises + 1)} <= ids, path
        assert "def solution" not in text and "class Solution" not in text, f"{path} holds a solution"
        for exercise in ex.exercises():
            if exercise.id.startswith(number):
                body = [line.strip() for line in exercise.solution.splitlines()
                        if line.strip().startswith("return ")]
                for line in body:
                    assert line not in text, f"{path} prints the answer of {exercise.id}: {line}"


# ----------------------------------------------------------------------------- the teacher's key
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _syllabus_questions():
    """(tutorial, question) of every bullet under "Predict before you run" in docs/syllabus.md."""
    with open(os.path.join(REPO, "docs", "syllabus.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Predict before you run", 1)[1].split("\n## ", 1)[0]
    questions, tutorial = [], None
    for line in section.splitlines():
        heading = re.match(r"\*\*(\d\d) ·", line)
        if heading:
            tutorial = heading.group(1)
        elif line.startswith("- "):
            questions.append((tutorial, line[2:].strip()))
    return questions


def test_the_key_answers_every_predict_question_of_the_syllabus():
    from minilora.exercises.key import PREDICT

    asked = _syllabus_questions()
    assert len(asked) >= 19
    assert [(t, q) for t, q, _ in PREDICT] == asked  # the same questions, in the syllabus's order
    assert all(len(answer) > 40 for _, _, answer in PREDICT)


def test_exercises_command_lists_and_the_key_holds_every_solution(capsys):
    from minilora.cli import main

    assert main(["exercises"]) == 0
    listing = capsys.readouterr().out
    assert main(["exercises", "--solutions"]) == 0
    key = capsys.readouterr().out
    for exercise in ex.exercises():
        assert exercise.id in listing and exercise.check in listing and exercise.paper
        assert exercise.solution.strip() in key, exercise.id
        assert exercise.solution.strip() not in listing  # the listing is for students too
    from minilora.exercises.key import PREDICT
    for _, question, answer in PREDICT:
        assert question in key and answer in key
        assert answer not in listing


@pytest.mark.parametrize("id", ["02.3", "04.1", "04.2", "06.1", "06.2", "09.3"])
def test_a_wrong_number_never_gets_the_right_one(id):
    from minilora.exercises.harness import num

    seen = []

    def wrong(*args):  # a plausible-looking number that no formula of the exercise gives
        seen.append(args)
        return 7777

    check = getattr(ex, next(e.check for e in ex.exercises() if e.id == id))
    message = _fails(check, wrong, "7,777")
    right = ex.solution(id)(*seen[-1])
    assert num(right) not in message and str(right) not in message, message
    assert "than" in message  # says which side the wrong number is on
