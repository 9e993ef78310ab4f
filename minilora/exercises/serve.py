"""Exercises of tutorial 05 (merge and serve): merge, switch tasks in a merged weight, a mixed batch."""

from __future__ import annotations

import numpy as np

from .. import backend as bk
from .. import functional as F
from .. import nn
from ..lora import BASE_ADAPTER, LoRAConfig, LoRALinear, mixed_batch
from ..tensor import no_grad, tensor
from .harness import Wrong, as_array, call, compare, exercise, register
from .lora_layer import lora_problem

__all__ = ["check_merge", "check_switch", "check_mixed_batch"]

register(
    "05.1", "merging W = W₀ + s·B A", "check_merge",
    paper="Sec. 4.1: W = W₀ + BA, no additional inference latency",
    hints=("the merged weight must give, through a plain F.linear, what the LoRA layer gives: which (d, k) matrix "
           "does the adapter add to W₀, with which factor?",
           "W = W₀ + scaling · lora_B @ lora_A; ΔW has W₀'s shape (d, k): B is (d, r), A is (r, k)."),
    solution='''
    def solution_merge(W0, lora_A, lora_B, scaling):
        return W0 + scaling * lora_B @ lora_A     # (d, r) @ (r, k): the update has W₀'s shape
    ''')

register(
    "05.2", "switching tasks in a merged weight", "check_switch",
    paper="Sec. 4.1: switching tasks, subtract BA and add B′A′",
    hints=("W holds W₀ plus the old task's update. Take that update out, then put the new one in, each "
           "with its own scaling; you never need W₀ itself.",
           "W − s·B A + s′·B′ A′, with (A, B, s) = old and (A′, B′, s′) = new."),
    solution='''
    def solution_switch(W, old, new):
        (A, B, s), (A_new, B_new, s_new) = old, new
        return W - s * B @ A + s_new * B_new @ A_new    # one task out, the other in
    ''')

register(
    "05.3", "a batch that mixes tasks", "check_mixed_batch",
    paper="Sec. 4.2 (limitations): a batch of tasks needs W₀x + B_i A_i x per row",
    hints=("every row shares x W₀ᵀ + b; then each row adds the low-rank term of ITS OWN adapter, named in "
           f"adapter_ids; rows named {BASE_ADAPTER!r} add nothing.",
           "h = x W₀ᵀ + b; for each adapter name with rows R: h[R] += s·(x[R] Aᵀ) Bᵀ of that adapter."),
    solution='''
    def solution_mixed(x, W0, bias, adapters, adapter_ids):
        h = x @ W0.T + bias                                   # shared by every row
        for name, (A, B, s) in adapters.items():
            rows = [i for i, n in enumerate(adapter_ids) if n == name]
            h[rows] += s * (x[rows] @ A.T) @ B.T              # only this adapter's rows
        return h                                              # "__base__" rows: nothing added
    ''')


@exercise("05.1")
def check_merge(fn) -> str:
    """fn(W0, lora_A, lora_B, scaling) -> the merged weight (d, k).

    Checked two ways: equal to W₀ + s·B A, and F.linear with it gives F.lora_linear's output.
    """
    x, W0, bias, A, B = lora_problem(3)
    s = 2.0
    merged = as_array(call(fn, {"W0": W0.copy(), "lora_A": A.copy(), "lora_B": B.copy(), "scaling": s}),
                      "merged weight", W0.shape)
    with no_grad():
        unmerged_out = F.lora_linear(tensor(x, dtype="float64"), tensor(W0, dtype="float64"),
                                     tensor(bias, dtype="float64"), tensor(A, dtype="float64"),
                                     tensor(B, dtype="float64"), s)
        merged_out = F.linear(tensor(x, dtype="float64"), tensor(merged, dtype="float64"), tensor(bias, dtype="float64"))
    if not np.allclose(bk.to_numpy(merged_out.data), bk.to_numpy(unmerged_out.data), rtol=1e-6, atol=1e-9):
        if np.allclose(merged, W0):
            raise Wrong("F.linear(x, your W) vs F.lora_linear(x, ...): your W is W₀ unchanged; the adapter is missing.")
        compare(merged - W0, s * B @ A, "F.linear(x, your W) differs from F.lora_linear(x, ...); the update you added "
                "to W₀", {1 / s: "did you drop the scaling?", s: "did you apply the scaling twice?"})
    return "F.linear with your merged W gives the LoRA layer's output: no extra work at inference"


def _times(c: float, s: float) -> str:
    """A coefficient as the student would recognise it: +1, −1, 0, s, 1/s, ..."""
    for value, name in ((1, "+1"), (-1, "−1"), (0, "0"), (s, "+s"), (-s, "−s"), (1 / s, "+1/s"), (-1 / s, "−1/s")):
        if np.isclose(c, value, rtol=1e-6, atol=1e-9):
            return name
    return f"{c:+.4g}"


def _switch_problem(change, old_update, new_update, s_old, s_new) -> str | None:
    """Explain ``change`` = (your W) − W as a·(old s·B A) + b·(new s′·B′ A′); None if it is no such mix.

    The right switch has a = −1 (the old update out) and b = +1 (the new one in).
    """
    basis = np.stack([old_update.ravel(), new_update.ravel()], axis=1)
    (a, b), *_ = np.linalg.lstsq(basis, change.ravel(), rcond=None)
    if np.linalg.norm(basis @ np.array([a, b]) - change.ravel()) > 1e-6 * max(1.0, np.linalg.norm(change)):
        return None
    parts = []
    if np.isclose(a, 1):
        parts.append("you added the old task's update s·B A again instead of taking it out (a sign error)")
    elif np.isclose(a, 0):
        parts.append("the old update is still in: take it out before putting the new one in")
    elif not np.isclose(a, -1):
        parts.append(f"the old update s·B A (s = {s_old:g}) enters your change with the factor {_times(a, s_old)}, "
                     "where taking it out exactly means −1: check its scaling")
    if np.isclose(b, -1):
        parts.append("the new task's update went in with the wrong sign")
    elif np.isclose(b, 0):
        parts.append("the new task's update is missing")
    elif not np.isclose(b, 1):
        parts.append(f"the new update s′·B′ A′ (s′ = {s_new:g}) enters with the factor {_times(b, s_new)}, "
                     "where +1 is right: check its scaling")
    return "; ".join(parts) + "." if parts else None


@exercise("05.2")
def check_switch(fn) -> str:
    """fn(W, old, new) -> the weight serving task ``new``; W currently holds W₀ + s·B A of ``old``.

    old and new are (lora_A, lora_B, scaling) triples of the same layer.
    """
    _, W0, _, A1, B1 = lora_problem(4)
    _, _, _, A2, B2 = lora_problem(5)
    s1, s2 = 2.0, 0.5
    W = W0 + s1 * B1 @ A1
    got = as_array(call(fn, {"W": W.copy(), "old": (A1.copy(), B1.copy(), s1), "new": (A2.copy(), B2.copy(), s2)}),
                   "new weight", W.shape)
    expected = W0 + s2 * B2 @ A2
    if not np.allclose(got, expected, rtol=1e-6, atol=1e-9):
        known = [(W0 + s1 * B2 @ A2, "the new update got the old task's scaling: each update has its own scaling"),
                 (W - B1 @ A1 + B2 @ A2, "both updates lost their scaling: each update has its own scaling")]
        for value, meaning in known:
            if np.allclose(got, value, rtol=1e-6, atol=1e-9):
                raise Wrong(f"the switched weight: {meaning}.")
        problem = _switch_problem(got - W, s1 * B1 @ A1, s2 * B2 @ A2, s1, s2)
        if problem:
            raise Wrong(f"the switched weight: {problem}")
        compare(got, expected, "the switched weight")
    return "W − s·B A + s'·B' A': one task out, the other in, without keeping a second copy of W₀"


@exercise("05.3")
def check_mixed_batch(fn) -> str:
    """fn(x, W0, bias, adapters, adapter_ids) -> h (N, d): row i through W₀ and adapter adapter_ids[i].

    adapters: {name: (lora_A, lora_B, scaling)}; the name ``"__base__"`` means "no adapter".
    Compared with a ``lora.LoRALinear`` holding the same adapters, called in ``lora.mixed_batch(layer, adapter_ids)``.
    """
    x, W0, bias, A1, B1 = lora_problem(6, n=6)
    _, _, _, A2, B2 = lora_problem(7, n=6)
    adapters = {"e2e": (A1, B1, 2.0), "parse": (A2, B2, 0.5)}
    layer = LoRALinear(nn.Linear(W0.shape[1], W0.shape[0], dtype=np.float64))
    layer.weight.data[...] = W0
    layer.bias.data[...] = bias
    for name, (A, B, s) in adapters.items():
        layer.add_adapter(name, LoRAConfig(r=A.shape[0], alpha=s * A.shape[0], target_modules=("x",)))
        layer.lora_A[name].data[...] = A
        layer.lora_B[name].data[...] = B
    adapter_ids = ["parse", "e2e", BASE_ADAPTER, "e2e", "parse", "parse"]
    with no_grad(), mixed_batch(layer, adapter_ids):
        expected = bk.to_numpy(layer(tensor(x, dtype="float64")).data)
    copies = {n: (A.copy(), B.copy(), s) for n, (A, B, s) in adapters.items()}
    got = as_array(call(fn, {"x": x.copy(), "W0": W0.copy(), "bias": bias.copy(), "adapters": copies,
                             "adapter_ids": list(adapter_ids)},
                        key_hints={BASE_ADAPTER: f"{BASE_ADAPTER!r} is not an adapter: it names the rows that get no "
                                                 "adapter (x W₀ᵀ + b only), so skip it instead of looking it up."}),
                   "h", expected.shape)
    wrong = [i for i in range(len(adapter_ids)) if not np.allclose(got[i], expected[i], rtol=1e-6, atol=1e-9)]
    if wrong:
        rows = ", ".join(f"{i} ({adapter_ids[i]!r})" for i in wrong)
        right = sorted({adapter_ids[i] for i in range(len(adapter_ids)) if i not in wrong})
        detail = f"; the rows of {', '.join(map(repr, right))} are right" if right else ""
        base_row = adapter_ids.index(BASE_ADAPTER)
        if base_row in wrong:
            detail += f"; the {BASE_ADAPTER!r} row must get x W₀ᵀ + b and nothing else"
        raise Wrong(f"h for adapter_ids={adapter_ids}: rows {rows} are wrong{detail}. Each row uses the adapter "
                    "its own entry of adapter_ids names.")
    return "each row used its own adapter (and the '__base__' row none), as LoRALinear under lora.mixed_batch"
