"""The machinery of the exercise checks: registration, graduated hints, solutions, diagnoses.

An exercise has an id ("02.1": tutorial 02, exercise 1), a title, two hints and a solution:

- hint 1 says where to look, without the formula;
- hint 2 is the formula (asked for with ``check_...(fn, hint_level=2)`` or ``show_hint(id, 2)``);
- the solution is source code, printed by ``show_solution(id)`` and never shown by a check.

A check compares the student's function with minilora. When it differs, the check raises
``ExerciseError`` whose message starts with a *diagnosis* of this answer (which entries, by how
much, and what that usually means: "0.4× the right one: did you drop the scaling s?"), then the
hints up to ``hint_level``. A crash in the student's code gets a message that matches the
exception (a ``KeyError`` gets "this key is not in the dict", a shape error the shapes).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import traceback

import numpy as np

import minilora as ml  # for the solutions' namespace (minilora itself never imports the exercises)

from .. import backend as bk
from .. import functional as F
from ..tensor import Tensor

__all__ = ["ExerciseError", "exercise", "register", "show_hint", "show_solution", "solution", "exercises",
           "output_dir", "save_figure"]


class ExerciseError(AssertionError):
    """Your answer differs from minilora's; the message says where and how."""


class NotYet(Exception):
    """The student's function still raises NotImplementedError."""


class Wrong(Exception):
    """Raised inside a check: ``diagnosis`` says what is wrong with this answer.

    ``with_hints=False`` for a crash in the student's code: the exercise's hints answer another
    question than "why did my code raise?".
    """

    def __init__(self, diagnosis: str, with_hints: bool = True):
        super().__init__(diagnosis)
        self.diagnosis = diagnosis
        self.with_hints = with_hints


@dataclasses.dataclass(frozen=True)
class Exercise:
    id: str
    title: str
    check: str      # the name of its check function
    hints: tuple    # (where to look, the formula)
    solution: str   # source code defining one function or class
    paper: str = ""  # the equation or section of the paper it works on


_EXERCISES: dict[str, Exercise] = {}
_HINTS_SHOWN: dict[str, int] = {}


def register(id: str, title: str, check: str, hints: tuple, solution: str, paper: str = "") -> Exercise:
    _EXERCISES[id] = Exercise(id, title, check, tuple(hints), inspect.cleandoc(solution) + "\n", paper)
    return _EXERCISES[id]


def exercises() -> list[Exercise]:
    """Every exercise, in tutorial order."""
    return [_EXERCISES[k] for k in sorted(_EXERCISES)]


def _get(id: str) -> Exercise:
    if id not in _EXERCISES:
        raise KeyError(f"no exercise {id!r}; the exercises are {sorted(_EXERCISES)}")
    return _EXERCISES[id]


def _hint_text(ex: Exercise, level: int) -> str:
    lines = []
    if level >= 1:
        lines.append(f"Hint: {ex.hints[0]}")
    if level >= 2:
        lines.append(f"Formula: {ex.hints[1]}")
    if level < 2:
        lines.append(f"More: show_hint({ex.id!r}, 2) or {ex.check}(..., hint_level=2) for the formula; "
                     f"show_solution({ex.id!r}) for a solution.")
    else:
        lines.append(f"Still stuck? show_solution({ex.id!r}) prints a solution.")
    return "\n".join(lines)


def show_hint(id: str, level: int | None = None) -> str:
    """Print a hint for exercise ``id``; each call without ``level`` gives the next one (1, then 2)."""
    ex = _get(id)
    if level is None:
        level = min(_HINTS_SHOWN.get(id, 0) + 1, len(ex.hints))
    level = max(1, min(int(level), len(ex.hints)))
    _HINTS_SHOWN[id] = max(level, _HINTS_SHOWN.get(id, 0))
    text = f"{ex.id} · {ex.title}\n" + "\n".join(
        f"{'Hint' if n == 0 else 'Formula'}: {h}" for n, h in enumerate(ex.hints[:level]))
    if level < len(ex.hints):
        text += f"\n(show_hint({id!r}) again for the formula)"
    print(text)
    return text


def show_solution(id: str) -> str:
    """Print a solution of exercise ``id`` (source code; try the exercise first)."""
    ex = _get(id)
    print(f"# {ex.id} · {ex.title}: one solution\n{ex.solution}")
    return ex.solution


def solution(id: str):
    """The solution of ``id`` as a Python object (the function or class its source defines)."""
    ex = _get(id)
    namespace = {"np": np, "ml": ml, "F": F, "bk": bk}
    exec(compile(ex.solution, f"<solution {id}>", "exec"), namespace)  # noqa: S102 (our own source text)
    defined = [v for k, v in namespace.items() if k.startswith(("solution", "Solution")) and callable(v)]
    return defined[-1]


def exercise(id: str):
    """Turn a checker into the check of exercise ``id``: ✓ and True, a reminder and None, or ExerciseError.

    The checker returns a success message or raises ``Wrong``; the wrapper adds the hints up to
    ``hint_level`` (keyword of every check: 0 diagnosis only, 1 default, 2 with the formula).
    """

    def wrap(checker):
        @functools.wraps(checker)
        def check(*args, hint_level: int = 1, **kwargs):
            ex = _get(id)
            try:
                message = checker(*args, **kwargs)
            except NotYet:
                print(f"… {ex.title}: not attempted yet (your function raises NotImplementedError). "
                      "Fill it in and run this cell again.")
                return None  # falsy, and a notebook cell ending in the check shows nothing more
            except Wrong as wrong:
                hints = _hint_text(ex, hint_level if wrong.with_hints else 0)
                raise ExerciseError(f"{ex.id} · {ex.title}: {wrong.diagnosis}\n{hints}") from None
            print(f"✓ {ex.title}: {message}")
            return True

        check.__doc__ = (checker.__doc__ or "") + (
            "\n\n    hint_level: 0 the diagnosis only, 1 (default) also a hint, 2 also the formula.")
        return check

    return wrap


# ----------------------------------------------------------------------------- numbers and arrays
def num(value) -> str:
    """A number as people write it: 0.251423, 8,192 (never np.float64(0.2514...))."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return f"{v:,.0f}" if v.is_integer() and abs(v) < 1e15 else f"{v:.6g}"
    if isinstance(value, np.ndarray) and value.size == 1:
        return num(value.item())
    return repr(value)


def describe(value) -> str:
    """'a (5, 6) float64 array', 'a Tensor (5, 6)', 'a list', ... for messages."""
    if isinstance(value, Tensor):
        return f"a minilora Tensor of shape {tuple(value.shape)}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a {type(value).__module__.split('.')[0]} array of shape {tuple(value.shape)} ({value.dtype})"
    return f"a {type(value).__name__}"


_SHAPE_WORDS = ("shape", "matmul", "broadcast", "aligned", "dimension", "operands could not")


def _line_in(fn, exc) -> str:
    """' (your line 3: `return x @ A`)' for the deepest frame of exc inside fn's own file."""
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "__call__", None), "__code__", None)
    filename = getattr(code, "co_filename", None)
    if filename is None and inspect.isclass(fn):
        try:
            filename = inspect.getsourcefile(fn)
        except TypeError:
            filename = None
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (in your code, {frame.name}, line {frame.lineno}: `{(frame.line or '').strip()}`)"


def crash(fn, exc: Exception, args: dict, key_hints: dict | None = None) -> Wrong:
    """A Wrong that explains an exception raised by the student's function ``fn`` called with ``args``."""
    where = _line_in(fn, exc)
    called = ", ".join(f"{name} = {describe(v)}" for name, v in args.items())
    kind = type(exc).__name__
    if isinstance(exc, KeyError):
        key = exc.args[0] if exc.args else None
        text = (f"your function raised KeyError({key!r}){where}: it looked up {key!r} in a dict that has no such key. "
                "Print the dict's keys (list(d)) to see what is there.")
        if key_hints and key in key_hints:
            text += " " + key_hints[key]
    elif isinstance(exc, (ValueError, TypeError)) and any(w in str(exc) for w in _SHAPE_WORDS):
        text = (f"your function raised {kind}: {exc}{where}. That is a shape mismatch. It was called with {called}. "
                "Write the shape next to every product: (n, m) @ (m, p) gives (n, p), and .T swaps the two axes.")
    elif isinstance(exc, IndexError):
        text = (f"your function raised IndexError: {exc}{where}: an index is out of range. It was called with {called}.")
    elif isinstance(exc, AttributeError):
        text = (f"your function raised AttributeError: {exc}{where}. It was called with {called}: "
                "check which kind of object each argument is before using its attributes.")
    elif isinstance(exc, NameError):
        text = (f"your function raised NameError: {exc}{where}: a name is not defined in your code "
                "(a typo, or an import that this cell does not have?).")
    elif isinstance(exc, ZeroDivisionError):
        text = f"your function raised ZeroDivisionError: {exc}{where}: something you divide by is 0 for these inputs ({called})."
    else:
        text = f"your function raised {kind}: {exc}{where}. It was called with {called}."
    return Wrong(text + " Hint: run it on the arguments above, line by line, to see where it goes wrong.",
                 with_hints=False)


def call(fn, args: dict, key_hints: dict | None = None):
    """Call the student's function with keyword-named positional ``args``; NotImplementedError: not tried yet."""
    if not callable(fn):
        raise Wrong(f"expected a function, got {describe(fn)}", with_hints=False)
    try:
        return fn(*args.values())
    except NotImplementedError:
        raise NotYet() from None
    except (ExerciseError, Wrong, NotYet):
        raise
    except Exception as exc:  # a crash in the student's code: say what it means
        raise crash(fn, exc, args, key_hints) from exc


def as_array(value, what: str, shape=None) -> np.ndarray:
    """A host float64 array of the student's result (a Tensor or any array), shape-checked."""
    if value is None:
        raise Wrong(f"{what}: your function returned None; did you forget `return`?", with_hints=False)
    if isinstance(value, Tensor):
        value = value.data
    try:
        a = np.asarray(bk.to_numpy(value), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise Wrong(f"{what}: could not read your result ({describe(value)}) as an array ({exc})") from None
    if shape is not None and a.shape != tuple(shape):
        shape = tuple(shape)
        extra = (" — that is the transpose of the right shape: a gradient has the shape of what it is the "
                 "gradient of, so check the order of your product's factors") if a.shape == shape[::-1] else ""
        raise Wrong(f"{what}: your result has shape {a.shape}, expected {shape}{extra}. "
                    "(n, m) @ (m, p) gives (n, p), and .T swaps the two axes.")
    return a


def as_number(value, what: str) -> float:
    """The student's scalar result as a float; None or something that is no number raises Wrong."""
    if value is None:
        raise Wrong(f"{what}: your function returned None; did you forget `return`?", with_hints=False)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise Wrong(f"{what} must be a number, got {type(value).__name__}", with_hints=False) from None


def side(got: float, expected: float, more: str = "more", fewer: str = "fewer") -> str:
    """Whether a wrong number is too large or too small, without saying the right one."""
    return more if got > expected else fewer


def known_mistake(got: float, mistakes, rel_tol=1e-9) -> str:
    """" <why>" for the first ``(wrong value, why)`` of ``mistakes`` that ``got`` equals (to ``rel_tol``), else ""."""
    for wrong, why in mistakes:
        if math.isclose(got, wrong, rel_tol=rel_tol):
            return " " + why
    return ""


def diagnose(got: np.ndarray, expected: np.ndarray, factors: dict | None = None, rtol=1e-6, atol=1e-9) -> str | None:
    """None when ``got`` equals ``expected``; else what is wrong, as a person would say it.

    factors: {factor: meaning}, e.g. {1 / s: "did you drop the scaling s?"}: a result that is
    exactly ``factor`` × the right one gets that question.
    """
    if not np.all(np.isfinite(got)):
        return "your result has NaN or inf entries"
    if np.allclose(got, expected, rtol=rtol, atol=atol):
        return None
    e2 = float(np.sum(expected * expected))
    if e2 > 0:
        c = float(np.sum(got * expected)) / e2
        residual = float(np.linalg.norm(got - c * expected)) / math.sqrt(e2)
        if residual < 1e-6:
            if abs(c) < 1e-12:
                return "your result is all zeros"
            for factor, meaning in (factors or {}).items():
                if math.isclose(c, factor, rel_tol=1e-6):
                    return f"your result is {num(c)}× the right one everywhere: {meaning}"
            if math.isclose(c, -1.0, rel_tol=1e-6):
                return "your result is the right one with the wrong sign (−1× everywhere)"
            return f"your result is {num(c)}× the right one everywhere: a constant factor is missing or extra"
    if got.ndim == 2 and got.shape[0] == got.shape[1] and np.allclose(got, expected.T, rtol=rtol, atol=atol):
        return "your result is the transpose of the right one"
    err = np.abs(got - expected)
    worst = np.unravel_index(int(np.argmax(err)), err.shape) if err.ndim else ()
    where = f" at index {tuple(int(i) for i in worst)}" if worst else ""
    bad = int((err > atol + rtol * np.abs(expected)).sum())
    return (f"your value{where} is {num(got[worst])}, minilora gives {num(expected[worst])} "
            f"({bad} of {err.size} entries differ)")


def compare(got: np.ndarray, expected: np.ndarray, what: str, factors: dict | None = None, rtol=1e-6, atol=1e-9):
    """Raise Wrong with the diagnosis when ``got`` differs from ``expected``."""
    problem = diagnose(got, expected, factors, rtol=rtol, atol=atol)
    if problem is not None:
        raise Wrong(f"{what}: {problem}.")


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- figures
def output_dir() -> str:
    """Where the tutorials write their figures: ``$MINILORA_OUT``, else ``tutorials/out/``.

    ``tutorials/out/`` is the folder next to the tutorials of a source checkout; when minilora
    is installed without them, ``./minilora-tutorials-out`` in the working directory.
    """
    path = os.environ.get("MINILORA_OUT", "").strip()
    if not path:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        tutorials = os.path.join(repo, "tutorials")
        path = os.path.join(tutorials, "out") if os.path.isdir(tutorials) else os.path.join(os.getcwd(), "minilora-tutorials-out")
    os.makedirs(path, exist_ok=True)
    return path


class SavedFigure(str):
    """The path of a figure ``save_figure`` wrote. A notebook shows the figure itself, never this path."""

    def _ipython_display_(self):  # IPython calls this instead of echoing the value below the cell
        pass


def _show_in_notebook(path: str) -> bool:
    """Show the PNG at ``path`` below the cell when this runs in a notebook; False elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return False
    if get_ipython() is None:
        return False
    display(Image(filename=path))
    return True


def save_figure(fig, name: str) -> str:
    """Save a matplotlib Figure as ``output_dir()/name`` (PNG) and return the path.

    In a Jupyter notebook the PNG is shown below the cell (and neither the path nor the return
    value is); run as a script, it prints "wrote PATH".
    """
    path = os.path.join(output_dir(), name)
    if fig.get_layout_engine() is None:  # a figure made with layout="constrained" keeps its own
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    shown = _show_in_notebook(path)
    if not shown:
        print(f"wrote {path}")
    return SavedFigure(path)
