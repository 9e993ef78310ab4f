"""Check functions for the exercises of the tutorials (``tutorials/*.py``).

Each tutorial ends with one to three exercises. You write a small function, then hand it to
the matching check, which compares it with minilora itself (and, for backward passes, runs
``ml.gradcheck`` on it)::

    from minilora.exercises import check_dA

    def my_dA(x, lora_A, lora_B, grad_h, scaling):
        ...                      # your formula, on NumPy arrays
    check_dA(my_dA)              # prints "✓ ..." and returns True, or raises ExerciseError

A check returns True when the answer is right. A wrong answer raises ``ExerciseError`` (an
AssertionError) whose message says what differs and gives a hint. An exercise you have not
tried yet (its function still raises ``NotImplementedError``) prints a reminder and returns
False, so a tutorial still runs from top to bottom before you have done its exercises.

Two helpers the tutorials share live here as well: ``output_dir()`` (where figures go) and
``save_figure(fig, name)``.

    tutorial              checks
    01_autograd           check_backward_by_hand, check_sigmoid
    02_lora_layer         check_dA, check_dB, check_lora_param_count
    03_tiny_transformer   check_loss_mask, check_masked_loss
    04_finetune           check_optimizer_state_bytes, check_trainable_params
    05_merge_and_serve    check_merge, check_switch, check_mixed_batch
    06_what_rank          check_subspace_similarity, check_random_subspace_baseline
    07_gpu                check_softmax_any_backend, check_host_logits
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from . import backend as bk
from . import functional as F
from .function import Function
from .gradcheck import GradcheckError, gradcheck
from .tensor import Tensor, no_grad, tensor

__all__ = [
    "ExerciseError",
    "check_backward_by_hand",
    "check_dA",
    "check_dB",
    "check_host_logits",
    "check_lora_param_count",
    "check_loss_mask",
    "check_masked_loss",
    "check_merge",
    "check_mixed_batch",
    "check_optimizer_state_bytes",
    "check_random_subspace_baseline",
    "check_sigmoid",
    "check_softmax_any_backend",
    "check_subspace_similarity",
    "check_switch",
    "check_trainable_params",
    "output_dir",
    "save_figure",
]


class ExerciseError(AssertionError):
    """Your answer differs from minilora's; the message says where and how."""


class _NotYet(Exception):
    pass


# ----------------------------------------------------------------------------- shared helpers
def output_dir() -> str:
    """Where the tutorials write their figures: ``$MINILORA_OUT``, else ``tutorials/out/``.

    ``tutorials/out/`` is the folder next to the tutorials of a source checkout; when minilora
    is installed without them, ``./minilora-tutorials-out`` in the working directory.
    """
    path = os.environ.get("MINILORA_OUT", "").strip()
    if not path:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        tutorials = os.path.join(repo, "tutorials")
        path = os.path.join(tutorials, "out") if os.path.isdir(tutorials) else os.path.join(os.getcwd(), "minilora-tutorials-out")
    os.makedirs(path, exist_ok=True)
    return path


def save_figure(fig, name: str) -> str:
    """Save a matplotlib Figure as ``output_dir()/name`` (PNG) and return the path.

    In a Jupyter notebook the PNG is also shown below the cell.
    """
    path = os.path.join(output_dir(), name)
    if fig.get_layout_engine() is None:  # a figure made with layout="constrained" keeps its own
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    try:  # inside a notebook: show it (IPython exists only there)
        from IPython import get_ipython
        from IPython.display import Image, display

        if get_ipython() is not None:
            display(Image(filename=path))
    except ImportError:
        pass
    return path


def _exercise(title: str):
    """Turn a checker into an exercise check: ✓ and True, a reminder and False, or ExerciseError."""

    def wrap(check):
        @functools.wraps(check)
        def run(*args, **kwargs):
            try:
                message = check(*args, **kwargs)
            except _NotYet:
                print(f"… {title}: not attempted yet (your function raises NotImplementedError). "
                      "Fill it in and run this cell again.")
                return False
            print(f"✓ {title}: {message}")
            return True

        return run

    return wrap


def _call(fn, *args):
    """Call the student's function; NotImplementedError means "not tried yet"."""
    if not callable(fn):
        raise ExerciseError(f"expected a function, got {type(fn).__name__}")
    try:
        return fn(*args)
    except NotImplementedError:
        raise _NotYet() from None
    except ExerciseError:
        raise
    except Exception as exc:  # a crash in the student's code: say where it came from
        shapes = ", ".join(str(tuple(a.shape)) if hasattr(a, "shape") else type(a).__name__ for a in args)
        raise ExerciseError(
            f"your function raised {type(exc).__name__}: {exc}. Hint: it was called with ({shapes}); "
            "check the shapes of what you multiply — (n, m) @ (m, p) gives (n, p)."
        ) from exc


_SHAPE_HINT = "Hint: a gradient has the shape of what it is the gradient of; (n, m) @ (m, p) gives (n, p), and .T swaps the two axes."


def _array(value, what: str, shape=None, hint: str = _SHAPE_HINT) -> np.ndarray:
    """A host float64 array of the student's result (a Tensor or any array), shape-checked."""
    if value is None:
        raise ExerciseError(f"{what}: your function returned None; did you forget `return`?")
    if isinstance(value, Tensor):
        value = value.data
    try:
        a = np.asarray(bk.to_numpy(value), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ExerciseError(f"{what}: could not read your result as an array ({exc})") from None
    if shape is not None and a.shape != tuple(shape):
        raise ExerciseError(
            f"{what}: your result has shape {a.shape}, expected {tuple(shape)}. {hint}"
        )
    return a


def _close(got: np.ndarray, expected: np.ndarray, what: str, hint: str, rtol=1e-6, atol=1e-9) -> None:
    if not np.all(np.isfinite(got)):
        raise ExerciseError(f"{what}: your result has NaN or inf entries. {hint}")
    if not np.allclose(got, expected, rtol=rtol, atol=atol):
        err = np.abs(got - expected)
        worst = np.unravel_index(int(np.argmax(err)), err.shape) if err.ndim else ()
        where = f" at index {tuple(int(i) for i in worst)}" if worst else ""
        raise ExerciseError(
            f"{what}: your value{where} is {float(got[worst]):.6g}, minilora gives {float(expected[worst]):.6g} "
            f"({int((err > atol + rtol * np.abs(expected)).sum())} of {err.size} entries differ). {hint}"
        )


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- 01 autograd
@_exercise("backward by hand")
def check_backward_by_hand(fn) -> str:
    """fn(x, w) -> (dx, dw): the gradients of L = Σ (tanh(x) @ w)², x (N, k), w (k, m), on NumPy arrays.

    Compared with minilora's autograd (``L.backward()``, then ``x.grad`` and ``w.grad``).
    """
    hint = ("Hint: go backwards through a = tanh(x), h = a @ w, L = Σ h²: dL/dh = 2h, dL/dw = aᵀ @ (dL/dh), "
            "dL/da = (dL/dh) @ wᵀ, dL/dx = dL/da ⊙ (1 − a²).")
    for seed, (n, k, m) in enumerate([(3, 4, 2), (5, 2, 3), (1, 3, 1)]):
        rng = _rng(seed)
        x_np, w_np = rng.standard_normal((n, k)), rng.standard_normal((k, m)) * 0.7
        x, w = tensor(x_np, requires_grad=True, dtype="float64"), tensor(w_np, requires_grad=True, dtype="float64")
        h = x.tanh() @ w
        (h * h).sum().backward()
        result = _call(fn, x_np.copy(), w_np.copy())
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise ExerciseError(f"your function must return two arrays (dx, dw), got {type(result).__name__}")
        dx, dw = _array(result[0], "dx", (n, k)), _array(result[1], "dw", (k, m))
        _close(dx, bk.to_numpy(x.grad), f"dx (x of shape {(n, k)})", hint)
        _close(dw, bk.to_numpy(w.grad), f"dw (w of shape {(k, m)})", hint)
    return "dx and dw equal minilora's x.grad and w.grad on three shapes"


@_exercise("Sigmoid as a Function")
def check_sigmoid(function_class) -> str:
    """function_class: a subclass of ``ml.Function`` with forward(x) = 1 / (1 + e^(−x)) and its backward.

    The forward is compared with NumPy; the backward is checked with ``ml.gradcheck``.
    """
    if not (isinstance(function_class, type) and issubclass(function_class, Function)):
        raise ExerciseError(f"pass your Function subclass itself (the class), got {function_class!r}")
    rng = _rng(0)
    x_np = rng.uniform(-4, 4, size=(3, 5))
    x = tensor(x_np, requires_grad=True, dtype="float64")
    try:
        y = function_class.apply(x)
    except NotImplementedError:
        raise _NotYet() from None
    except Exception as exc:
        raise ExerciseError(f"{function_class.__name__}.apply(x) raised {type(exc).__name__}: {exc}") from exc
    _close(_array(y, "forward", x_np.shape), 1.0 / (1.0 + np.exp(-x_np)), "forward",
           "forward(x) should return 1 / (1 + exp(−x)) on the raw array x.")
    try:
        gradcheck(lambda t: function_class.apply(t), [x])
    except NotImplementedError:
        raise _NotYet() from None
    except GradcheckError as exc:
        raise ExerciseError(
            f"{function_class.__name__}.backward is wrong: {exc}. Hint: with y = σ(x), dy/dx = y (1 − y); "
            "save y in forward (self.save_for_backward(y)) and return grad * y * (1 − y)."
        ) from None
    except Exception as exc:
        raise ExerciseError(f"{function_class.__name__}.backward raised {type(exc).__name__}: {exc}") from exc
    return "forward matches 1/(1+e^(−x)) and gradcheck passes"


# ----------------------------------------------------------------------------- 02 the LoRA layer
def _lora_problem(seed: int, n=5, k=6, d=4, r=3):
    rng = _rng(seed)
    return (rng.standard_normal((n, k)), rng.standard_normal((d, k)) * 0.5, rng.standard_normal(d) * 0.1,
            rng.standard_normal((r, k)) * 0.5, rng.standard_normal((d, r)) * 0.5)


def _student_lora_function(fn, which: str):
    """A Function: forward is the LoRA layer; the gradient of ``which`` (A or B) comes from ``fn``."""

    class StudentLoRA(Function):
        def forward(self, lora_A, lora_B, x=None, weight=None, bias=None, scaling=1.0):
            self.save_for_backward(x, lora_A, lora_B)
            self.scaling = scaling
            return x @ weight.T + bias + scaling * (x @ lora_A.T) @ lora_B.T  # h = W0 x + b + s B A x

        def backward(self, grad):
            x, lora_A, lora_B = self.saved
            if which == "A":
                mine = _array(_call(fn, x.copy(), lora_A.copy(), lora_B.copy(), grad.copy(), self.scaling),
                              "dA", lora_A.shape)
                return mine, None
            mine = _array(_call(fn, x.copy(), lora_A.copy(), lora_B.copy(), grad.copy(), self.scaling),
                          "dB", lora_B.shape)
            return None, mine

    return StudentLoRA


def _check_lora_gradient(fn, which: str, hint: str) -> str:
    StudentLoRA = _student_lora_function(fn, which)
    for seed, scaling in ((0, 2.5), (1, 0.5)):
        x, weight, bias, lora_A, lora_B = _lora_problem(seed)
        A = tensor(lora_A, requires_grad=which == "A", dtype="float64")
        Bm = tensor(lora_B, requires_grad=which == "B", dtype="float64")
        try:
            gradcheck(lambda a, b, x=x, weight=weight, bias=bias, scaling=scaling:
                      StudentLoRA.apply(a, b, x=x, weight=weight, bias=bias, scaling=scaling), [A, Bm])
        except GradcheckError as exc:
            raise ExerciseError(f"d{which} (scaling s = {scaling}): {exc}. {hint}") from None
        # and the library's fused backward agrees (the formula in F.lora_linear's docstring)
        A_lib = tensor(lora_A, requires_grad=True, dtype="float64")
        B_lib = tensor(lora_B, requires_grad=True, dtype="float64")
        g = _rng(seed + 10).standard_normal((x.shape[0], weight.shape[0]))
        F.lora_linear(tensor(x, dtype="float64"), tensor(weight, dtype="float64"), tensor(bias, dtype="float64"),
                      A_lib, B_lib, scaling).backward(g)
        mine = _array(_call(fn, x.copy(), lora_A.copy(), lora_B.copy(), g.copy(), scaling), f"d{which}")
        expected = bk.to_numpy((A_lib if which == "A" else B_lib).grad)
        _close(mine, expected, f"d{which} against F.lora_linear's backward", hint)
    return f"gradcheck passes and your d{which} equals F.lora_linear's hand-written backward"


@_exercise("dA of the LoRA layer")
def check_dA(fn) -> str:
    """fn(x, lora_A, lora_B, grad_h, scaling) -> ∂L/∂A (r, k).

    x (N, k) is the layer input, grad_h (N, d) = ∂L/∂h, h = W₀x + b + s·B A x. Runs
    ``ml.gradcheck`` on a LoRA layer whose backward uses your dA.
    """
    return _check_lora_gradient(fn, "A", "Hint: u = x Aᵀ is (N, r) and h gets s·u Bᵀ, so ∂L/∂u = s·grad_h B and "
                                         "∂L/∂A = (∂L/∂u)ᵀ x = s·(grad_h B)ᵀ x, shape (r, k).")


@_exercise("dB of the LoRA layer")
def check_dB(fn) -> str:
    """fn(x, lora_A, lora_B, grad_h, scaling) -> ∂L/∂B (d, r); checked like ``check_dA``."""
    return _check_lora_gradient(fn, "B", "Hint: h gets s·u Bᵀ with u = x Aᵀ (N, r), so ∂L/∂B = s·grad_hᵀ u, "
                                         "shape (d, r).")


@_exercise("counting LoRA parameters")
def check_lora_param_count(fn) -> str:
    """fn(d, k, r, n_matrices) -> the number of trainable LoRA parameters.

    n_matrices weight matrices W₀ ∈ R^{d×k} each get B (d × r) and A (r × k).
    """
    cases = [(1024, 1024, 4, 1), (128, 128, 4, 8), (12288, 12288, 1, 2 * 96), (512, 128, 8, 3), (96, 384, 2, 5)]
    for d, k, r, n in cases:
        got = _call(fn, d, k, r, n)
        expected = n * r * (d + k)
        if got != expected:
            square = "" if d == k else f" (W₀ is not square here: d = {d}, k = {k})"
            raise ExerciseError(
                f"d={d}, k={k}, r={r}, n_matrices={n}: you give {got!r}, the answer is {expected:,}{square}. "
                "Hint: B is d × r and A is r × k; for square matrices this is the paper's 2 × L̂ × d_model × r."
            )
    return "right for square and non-square matrices (GPT-3, r = 1 on Wq and Wv of 96 layers: 4,718,592)"


# ----------------------------------------------------------------------------- 03 the transformer
@_exercise("the loss mask of eq. 2")
def check_loss_mask(fn) -> str:
    """fn(n_prompt, n_tokens, width) -> a mask of length ``width`` (1 where the loss counts).

    The sequence [bos] x [sep] y [eos] has n_tokens tokens, the first n_prompt of which are
    [bos] x [sep]. The model reads seq[:-1] and predicts seq[1:], padded to ``width``.
    Compared with ``minilora.data.collate`` on real task examples.
    """
    from .data import Tokenizer, collate, encode_example, load_task

    tokenizer = Tokenizer.default()
    examples = load_task("classify", "test", 3) + load_task("e2e", "test", 3)
    batch = collate(examples, tokenizer)
    width = batch.mask.shape[1]
    for row, example in enumerate(examples):
        ids, n_prompt = encode_example(tokenizer, example)
        got = _array(_call(fn, n_prompt, len(ids), width), "mask", (width,),
                     "Hint: one entry per input position t = 0 … width − 1 of the padded batch.")
        expected = batch.mask[row].astype(np.float64)
        if not np.array_equal(got, expected):
            first = int(np.argmax(got != expected))
            raise ExerciseError(
                f"row {row} (n_prompt={n_prompt}, n_tokens={len(ids)}, width={width}): your mask differs from "
                f"collate's first at position {first} (yours {got[first]:g}, collate's {expected[first]:g}). "
                "Hint: position t predicts seq[t + 1]; it counts when seq[t + 1] is a y token or the final <eos>, "
                f"i.e. for t = n_prompt − 1 … n_tokens − 2 (here {n_prompt - 1} … {len(ids) - 2})."
            )
    return "your mask equals collate's on six real examples (prompt, y tokens, padding)"


@_exercise("the masked loss of eq. 2")
def check_masked_loss(fn) -> str:
    """fn(logits, targets, mask) -> a scalar Tensor: mean NLL over the positions where mask == 1.

    logits: a Tensor (bk, T, V) that requires grad; targets: int array (bk, T); mask: float
    array (bk, T). Value and gradient are compared with ``F.cross_entropy(logits, targets, mask=mask)``.
    """
    hint = ("Hint: logp = F.log_softmax(logits, axis=-1); pick logp at the targets (e.g. multiply by a one-hot "
            "array and sum over the last axis), multiply by the mask, sum, and divide by mask.sum() — not by B·T.")
    for seed in range(2):
        rng = _rng(seed)
        shape, V = (2, 5), 7
        logits_np = rng.standard_normal((*shape, V))
        targets = rng.integers(0, V, size=shape)
        mask = (rng.random(shape) < 0.6).astype(np.float64)
        mask[0, -1] = 1.0
        ref_logits = tensor(logits_np, requires_grad=True, dtype="float64")
        ref = F.cross_entropy(ref_logits, targets, mask=mask)
        ref.backward()
        logits = tensor(logits_np, requires_grad=True, dtype="float64")
        loss = _call(fn, logits, targets.copy(), mask.copy())
        if not isinstance(loss, Tensor):
            raise ExerciseError(f"return a minilora Tensor (built from logits with minilora ops), got {type(loss).__name__}")
        if loss.size != 1:
            raise ExerciseError(f"the loss must be one number (a mean), got shape {tuple(loss.shape)}. {hint}")
        _close(_array(loss, "loss").reshape(()), np.asarray(float(ref.item())), "the loss value", hint)
        if not loss.requires_grad:
            raise ExerciseError("your loss does not require grad: build it from `logits` with minilora ops "
                                "(not from logits.data or NumPy), so that backward reaches the logits")
        loss.backward()
        if logits.grad is None:
            raise ExerciseError("after loss.backward() the logits got no gradient")
        _close(bk.to_numpy(logits.grad), bk.to_numpy(ref_logits.grad), "the gradient of the logits", hint)
    return "value and gradient equal F.cross_entropy(logits, targets, mask=mask)"


# ----------------------------------------------------------------------------- 04 fine-tuning
def _tiny_gpt(dtype="float32", seed=0):
    from .models import GPT, GPTConfig

    bk.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, d_model=16))
    return model.to(dtype=dtype)


@_exercise("optimizer-state memory")
def check_optimizer_state_bytes(fn) -> str:
    """fn(n_trainable, bytes_per_value) -> bytes of AdamW's state for n_trainable parameters.

    Compared with ``optim.AdamW(...).state_bytes()`` for full fine-tuning and for LoRA, in
    float32 and float64.
    """
    from . import lora, optim

    for dtype in ("float32", "float64"):
        for method in ("full", "lora"):
            model = _tiny_gpt(dtype)
            if method == "lora":
                lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")))
                lora.mark_only_lora_as_trainable(model)
            n = model.num_parameters(trainable_only=True)
            itemsize = np.dtype(dtype).itemsize
            expected = optim.AdamW(model.parameters(), lr=1e-3).state_bytes()
            got = _call(fn, n, itemsize)
            if got != expected:
                raise ExerciseError(
                    f"{method} fine-tuning in {dtype}: {n:,} trainable values of {itemsize} bytes; you give {got!r} "
                    f"bytes, AdamW holds {expected:,}. Hint: AdamW keeps two running averages per trained value "
                    "(m, the first moment, and v, the second), each of the parameter's dtype; frozen W₀ gets none."
                )
    return "matches AdamW.state_bytes() for full fine-tuning and LoRA, float32 and float64"


@_exercise("counting a model's LoRA parameters")
def check_trainable_params(fn) -> str:
    """fn(config, r, targets) -> |Θ| of LoRA with rank r on ``targets`` of a GPT with GPTConfig ``config``.

    targets: names among "q", "k", "v", "o" (d → d) and "fc" (d → 4d), "proj" (4d → d).
    Compared with ``apply_lora`` + ``mark_only_lora_as_trainable`` on a real model.
    """
    from . import lora
    from .models import GPT, GPTConfig

    cases = [(4, ("q", "v")), (2, ("q", "k", "v", "o")), (3, ("fc",)), (1, ("q", "fc", "proj"))]
    for cfg in (GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, d_model=16),
                GPTConfig(vocab_size=20, block_size=8, n_layer=3, n_head=2, d_model=24)):
        for r, targets in cases:
            model = GPT(cfg)
            lora.apply_lora(model, lora.LoRAConfig(r=r, alpha=2 * r, target_modules=targets))
            lora.mark_only_lora_as_trainable(model)
            expected = model.num_parameters(trainable_only=True)
            got = _call(fn, cfg, r, tuple(targets))
            if got != expected:
                raise ExerciseError(
                    f"n_layer={cfg.n_layer}, d_model={cfg.d_model}, r={r}, targets={targets}: you give {got!r}, "
                    f"the model has {expected:,} trainable parameters. Hint: each adapted d_out × d_in matrix "
                    "adds r·(d_out + d_in); fc is d_model → 4·d_model and proj is 4·d_model → d_model."
                )
    return "matches apply_lora on two model sizes and four target sets"


# ----------------------------------------------------------------------------- 05 merge and serve
@_exercise("merging W = W₀ + s·B A")
def check_merge(fn) -> str:
    """fn(W0, lora_A, lora_B, scaling) -> the merged weight (d, k).

    Checked two ways: equal to W₀ + s·B A, and F.linear with it gives F.lora_linear's output.
    """
    hint = "Hint: ΔW = scaling · lora_B @ lora_A has W₀'s shape (d, k): B is (d, r), A is (r, k)."
    x, W0, bias, A, Bm = _lora_problem(3)
    merged = _array(_call(fn, W0.copy(), A.copy(), Bm.copy(), 2.0), "merged weight", W0.shape,
                    "Hint: the merged weight has W₀'s shape (d, k); B A is (d, r) @ (r, k).")
    with no_grad():
        unmerged_out = F.lora_linear(tensor(x, dtype="float64"), tensor(W0, dtype="float64"),
                                     tensor(bias, dtype="float64"), tensor(A, dtype="float64"),
                                     tensor(Bm, dtype="float64"), 2.0)
        merged_out = F.linear(tensor(x, dtype="float64"), tensor(merged, dtype="float64"), tensor(bias, dtype="float64"))
    _close(bk.to_numpy(merged_out.data), bk.to_numpy(unmerged_out.data), "F.linear(x, your W) vs F.lora_linear(x, ...)",
           hint)
    return "F.linear with your merged W gives the LoRA layer's output: no extra work at inference"


@_exercise("switching tasks in a merged weight")
def check_switch(fn) -> str:
    """fn(W, old, new) -> the weight serving task ``new``; W currently holds W₀ + s·B A of ``old``.

    old and new are (lora_A, lora_B, scaling) triples of the same layer.
    """
    _, W0, _, A1, B1 = _lora_problem(4)
    _, _, _, A2, B2 = _lora_problem(5)
    W = W0 + 2.0 * B1 @ A1
    got = _array(_call(fn, W.copy(), (A1.copy(), B1.copy(), 2.0), (A2.copy(), B2.copy(), 0.5)), "new weight", W.shape)
    _close(got, W0 + 0.5 * B2 @ A2, "the switched weight",
           "Hint: subtract the old update (s·B A), then add the new one (s'·B' A'), each with its own scaling.")
    return "W − s·B A + s'·B' A': one task out, the other in, without keeping a second copy of W₀"


@_exercise("a batch that mixes tasks")
def check_mixed_batch(fn) -> str:
    """fn(x, W0, bias, adapters, adapter_ids) -> h (N, d): row i through W₀ and adapter adapter_ids[i].

    adapters: {name: (lora_A, lora_B, scaling)}; the name ``"__base__"`` means "no adapter".
    Compared with a ``lora.LoRALinear`` holding the same adapters, called with ``adapter_ids``.
    """
    from . import nn
    from .lora import BASE_ADAPTER, LoRAConfig, LoRALinear

    x, W0, bias, A1, B1 = _lora_problem(6, n=6)
    _, _, _, A2, B2 = _lora_problem(7, n=6)
    adapters = {"e2e": (A1, B1, 2.0), "parse": (A2, B2, 0.5)}
    layer = LoRALinear(nn.Linear(W0.shape[1], W0.shape[0], dtype=np.float64))
    layer.weight.data[...] = W0
    layer.bias.data[...] = bias
    for name, (A, Bm, s) in adapters.items():
        layer.add_adapter(name, LoRAConfig(r=A.shape[0], alpha=s * A.shape[0], target_modules=("x",)))
        layer.lora_A[name].data[...] = A
        layer.lora_B[name].data[...] = Bm
    adapter_ids = ["parse", "e2e", BASE_ADAPTER, "e2e", "parse", "parse"]
    with no_grad():
        expected = bk.to_numpy(layer(tensor(x, dtype="float64"), adapter_ids=adapter_ids).data)
    copies = {n: (A.copy(), Bm.copy(), s) for n, (A, Bm, s) in adapters.items()}
    got = _array(_call(fn, x.copy(), W0.copy(), bias.copy(), copies, list(adapter_ids)), "h", expected.shape)
    _close(got, expected, f"h for adapter_ids={adapter_ids}",
           "Hint: every row gets x W₀ᵀ + b; a row whose name is an adapter adds s·(x Aᵀ) Bᵀ of THAT adapter; "
           f"{BASE_ADAPTER!r} rows add nothing.")
    return "each row used its own adapter (and the '__base__' row none), as LoRALinear(x, adapter_ids=...)"


# ----------------------------------------------------------------------------- 06 what rank
@_exercise("subspace similarity φ (eq. 4)")
def check_subspace_similarity(fn) -> str:
    """fn(A1, A2, i, j) -> φ(A1, A2, i, j) = ‖U₁ⁱᵀ U₂ʲ‖²_F / min(i, j) on the right-singular vectors of A.

    Compared with ``minilora.analysis.subspace_similarity``.
    """
    from .analysis import subspace_similarity

    rng = _rng(0)
    A1, A2 = rng.standard_normal((4, 10)), rng.standard_normal((8, 10))
    A2[:2] += 3 * A1[:2]  # some shared directions, so φ is neither ~0 nor 1
    for i, j in ((1, 1), (2, 5), (4, 8), (3, 2)):
        got = _call(fn, A1.copy(), A2.copy(), i, j)
        try:
            got = float(got)
        except (TypeError, ValueError):
            raise ExerciseError(f"φ must be a number, got {type(got).__name__}") from None
        expected = subspace_similarity(A1, A2, i, j)
        if not math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9):
            raise ExerciseError(
                f"φ(A1, A2, i={i}, j={j}) with A1 {A1.shape}, A2 {A2.shape}: you give {got:.6g}, minilora gives "
                f"{expected:.6g}. Hint: U = the rows of Vᵀ from np.linalg.svd(A, full_matrices=False) — the RIGHT "
                "singular vectors, which live in R^k like the input x; take the top i of A1 and top j of A2, "
                "then ‖U₁ U₂ᵀ‖²_F / min(i, j)."
            )
    return "equal to analysis.subspace_similarity for four (i, j)"


@_exercise("φ of random subspaces")
def check_random_subspace_baseline(fn) -> str:
    """fn(i, j, k) -> E[φ] for a random i-dimensional and a random j-dimensional subspace of R^k."""
    for i, j, k in ((1, 1, 128), (8, 64, 128), (4, 2, 16), (3, 3, 12288)):
        got = _call(fn, i, j, k)
        expected = max(i, j) / k
        try:
            ok = math.isclose(float(got), expected, rel_tol=1e-9)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ExerciseError(
                f"i={i}, j={j}, k={k}: you give {got!r}, the expectation is {expected:.6g}. Hint: each of the "
                "i·j squared cosines between a unit vector of one subspace and one of the other has mean 1/k, so "
                "E‖U₁ⁱᵀU₂ʲ‖²_F = i·j/k; now divide by min(i, j)."
            )
    return "max(i, j)/k: tiny for GPT-3's k = 12288, but 1/16 already for i = j = 8 at our k = 128"


# ----------------------------------------------------------------------------- 07 GPU
def _backends():
    """NumPy, strict (CuPy's rules without a GPU: an np.exp on a device array fails there) and CuPy where present."""
    return ["numpy", "strict", "cupy"] if bk.cupy_available() else ["numpy", "strict"]


@_exercise("a softmax for any backend")
def check_softmax_any_backend(fn) -> str:
    """fn(a) -> softmax of a raw array over its last axis, on the array's own backend and dtype.

    Tried on NumPy and strict float32 and float64 arrays (and CuPy ones where a GPU is present), with
    logits as large as 1000 (a stable softmax subtracts the row maximum first).
    """
    rng = _rng(0)
    host = rng.standard_normal((3, 6)) * 3
    host[1] += 1000.0  # exp(1000) overflows: only a stable softmax survives
    expected = np.exp(host - host.max(axis=-1, keepdims=True))
    expected /= expected.sum(axis=-1, keepdims=True)
    for backend in _backends():
        for dtype in ("float32", "float64"):
            a = bk.asarray(host, dtype=dtype, backend=backend)
            got = _call(fn, a)
            if got is None:
                raise ExerciseError("your function returned None; did you forget `return`?")
            if bk.backend_of(got) != backend or not hasattr(got, "dtype"):
                raise ExerciseError(
                    f"for a {backend} array you returned a {type(got).__module__}.{type(got).__name__}; "
                    "use xp = ml.backend.get_array_module(a) and xp.exp / xp.max, so a CuPy input stays on the GPU"
                )
            if got.dtype != np.dtype(dtype):
                raise ExerciseError(
                    f"a {dtype} input came back as {got.dtype}. Hint: a NumPy float64 scalar (np.float64(...)) "
                    "upcasts float32 arrays; Python floats and the array's own methods keep the dtype"
                )
            tol = 1e-5 if dtype == "float32" else 1e-12
            _close(np.asarray(bk.to_numpy(got), dtype=np.float64), expected, f"softmax of a {backend} {dtype} array",
                   "Hint: subtract a.max(axis=-1, keepdims=True) before exp (row 1 holds logits near 1000), then "
                   "divide by the sum over the last axis.", rtol=tol, atol=tol)
    where = ", strict and CuPy" if "cupy" in _backends() else " and strict (no GPU here: CuPy is checked where one is present)"
    return f"stable, dtype-preserving, on NumPy{where}"


@_exercise("logits back on the host")
def check_host_logits(fn) -> str:
    """fn(model, idx) -> the model's logits for token ids ``idx`` as a host NumPy array.

    Tried with a NumPy model, a strict copy (and a CuPy copy where a GPU is present); compared with model(idx).
    """
    import copy

    model = _tiny_gpt("float32")
    model.eval()
    idx = _rng(0).integers(0, 20, size=(2, 5))
    with no_grad():
        expected = bk.to_numpy(model(idx).data)
    for backend in _backends():
        m = model if backend == "numpy" else copy.deepcopy(model).to(backend=backend)
        got = _call(fn, m, idx.copy())
        if not isinstance(got, np.ndarray):
            raise ExerciseError(
                f"on the {backend} backend you returned a {type(got).__module__}.{type(got).__name__}; return a "
                "NumPy array on the host: ml.backend.to_numpy(model(idx)) (it copies from the GPU when needed)"
            )
        _close(got.astype(np.float64), expected.astype(np.float64), f"logits on {backend}",
               "Hint: run the model under ml.no_grad() and convert the result with ml.backend.to_numpy.",
               rtol=1e-4, atol=1e-5)
    return "a host NumPy array equal to model(idx)" + ("" if "cupy" in _backends() else " (NumPy and strict: no GPU here)")
