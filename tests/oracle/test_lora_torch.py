"""Layer-level oracle: minilora's LoRA layer against the same layer written in PyTorch.

h = x W₀ᵀ + b + s·(x Aᵀ) Bᵀ (eq. 3) in torch float64, autograd for the gradients: the output
and the gradients of x, A and B (and of W₀, b when they train) must agree to 1e-10. The
merged weight W₀ + s·B A and the mixed-task batch are checked against torch too.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="PyTorch oracle not installed: pip install torch==2.13.0")

import minilora as ml
from minilora import backend as bk
from minilora import functional as F
from minilora import lora, nn

TOL = 1e-10


def rel_error(actual, expected) -> float:
    """max |a − e| / max(max |e|, 1): the worst element relative to the array's scale."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(actual - expected).max(initial=0.0) / max(np.abs(expected).max(initial=0.0), 1.0))


def torch_lora(x, W, b, A, Bm, s):
    h = x @ W.T + s * (x @ A.T) @ Bm.T
    return h + b if b is not None else h


@st.composite
def layer_cases(draw):
    d, k = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    r = draw(st.integers(1, min(d, k)))
    batch = tuple(draw(st.lists(st.integers(1, 4), max_size=2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    arrays = {"x": rng.standard_normal(batch + (k,)), "W": rng.standard_normal((d, k)), "b": rng.standard_normal(d),
                  "A": rng.standard_normal((r, k)), "B": rng.standard_normal((d, r))}
    return arrays, draw(st.floats(0.25, 32.0)) / r, draw(st.booleans())


@given(layer_cases())
def test_lora_linear_matches_torch(backend, case):
    arrays, s, weight_trains = case
    trains = {"x": True, "W": weight_trains, "b": weight_trains, "A": True, "B": True}
    ours = {n: ml.tensor(a, requires_grad=trains[n], dtype="float64") for n, a in arrays.items()}
    theirs = {n: torch.tensor(a, dtype=torch.float64, requires_grad=trains[n]) for n, a in arrays.items()}
    h = F.lora_linear(ours["x"], ours["W"], ours["b"], ours["A"], ours["B"], s)
    h_t = torch_lora(theirs["x"], theirs["W"], theirs["b"], theirs["A"], theirs["B"], s)
    assert rel_error(bk.to_numpy(h.data), h_t.detach().numpy()) <= TOL
    g = np.random.default_rng(1).standard_normal(h.shape)
    h.backward(bk.asarray(g))
    h_t.backward(torch.tensor(g))
    for n in arrays:
        if trains[n]:
            assert rel_error(bk.to_numpy(ours[n].grad), theirs[n].grad.numpy()) <= TOL, n
        else:
            assert ours[n].grad is None and theirs[n].grad is None, n


@given(layer_cases())
def test_merged_weight_matches_torch(backend, case):
    arrays, s, _ = case
    d, k = arrays["W"].shape
    r = arrays["A"].shape[0]
    layer = lora.LoRALinear(nn.Linear(k, d, dtype="float64"))
    layer.weight.data[...] = bk.asarray(arrays["W"])
    layer.add_adapter("a", lora.LoRAConfig(r=r, alpha=s * r, target_modules="q"))
    layer.lora_A["a"].data[...] = bk.asarray(arrays["A"])
    layer.lora_B["a"].data[...] = bk.asarray(arrays["B"])
    layer.commit_merge(["a"], layer.plan_merge(["a"]))
    W, A, Bm = (torch.tensor(arrays[n], dtype=torch.float64) for n in ("W", "A", "B"))
    assert rel_error(bk.to_numpy(layer.weight.data), (W + s * Bm @ A).numpy()) <= 1e-14


def test_mixed_batch_matches_torch(backend):
    """Three adapters and base rows in one batch: torch runs each row with its own (A, B)."""
    rng = np.random.default_rng(0)
    rows, T, d, k = 6, 3, 5, 7
    ids = ["a", "__base__", "b", "a", "c", "b"]
    ranks, scalings = {"a": 2, "b": 1, "c": 3}, {"a": 0.5, "b": 2.0, "c": 1.5}
    x, W, b = rng.standard_normal((rows, T, k)), rng.standard_normal((d, k)), rng.standard_normal(d)
    As = {n: rng.standard_normal((r, k)) for n, r in ranks.items()}
    Bs = {n: rng.standard_normal((d, r)) for n, r in ranks.items()}
    groups = lora.group_rows(ids, bk.get_backend())
    ours = {n: ml.tensor(As[n], requires_grad=True, dtype="float64") for n in groups.names}
    ours_B = {n: ml.tensor(Bs[n], requires_grad=True, dtype="float64") for n in groups.names}
    xt = ml.tensor(x, requires_grad=True, dtype="float64")
    h = lora.mixed_lora_linear(xt, ml.tensor(W), ml.tensor(b), [ours[n] for n in groups.names],
                               [ours_B[n] for n in groups.names], [scalings[n] for n in groups.names], groups.selectors)
    theirs = {n: torch.tensor(As[n], requires_grad=True) for n in ranks}
    theirs_B = {n: torch.tensor(Bs[n], requires_grad=True) for n in ranks}
    xt_t = torch.tensor(x, requires_grad=True)
    W_t, b_t = torch.tensor(W), torch.tensor(b)
    h_t = torch.stack([
        torch_lora(xt_t[i], W_t, b_t, theirs[n], theirs_B[n], scalings[n]) if n != "__base__" else xt_t[i] @ W_t.T + b_t
        for i, n in enumerate(ids)
    ])
    assert rel_error(bk.to_numpy(h.data), h_t.detach().numpy()) <= TOL
    g = rng.standard_normal(h.shape)
    h.backward(bk.asarray(g))
    h_t.backward(torch.tensor(g))
    assert rel_error(bk.to_numpy(xt.grad), xt_t.grad.numpy()) <= TOL
    for n in ranks:
        assert rel_error(bk.to_numpy(ours[n].grad), theirs[n].grad.numpy()) <= TOL, n
        assert rel_error(bk.to_numpy(ours_B[n].grad), theirs_B[n].grad.numpy()) <= TOL, n
