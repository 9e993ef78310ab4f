"""Whole-model oracle: minilora's GPT against an independent PyTorch GPT on the same weights.

Logits, the masked loss (eq. 1/2: only mask == 1 positions count) and the gradient of EVERY
parameter must agree to a relative error of 1e-9 in float64.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch oracle not installed: pip install torch==2.13.0")

from minilora import backend as bk
from minilora.models import GPT, GPTConfig

from benchmarks.torch_gpt import build_torch_gpt  # the repository root is on sys.path (tests/conftest.py)

RTOL = 1e-9

CONFIGS = [
    pytest.param({"vocab_size": 13, "block_size": 7, "n_layer": 3, "n_head": 2, "d_model": 16}, 3, id="V13-T7-d16-L3-H2"),
    pytest.param({"vocab_size": 29, "block_size": 9, "n_layer": 2, "n_head": 3, "d_model": 24}, 2, id="V29-T9-d24-L2-H3"),
]


def rel_error(actual, expected) -> float:
    """max |a − e| / max |e|: the worst element relative to the array's scale."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-300))


def randomize(model, rng, scale=0.5):
    """Weights well away from the init (LayerNorm gains ≠ 1, biases ≠ 0): every path matters."""
    for name, p in model.named_parameters():
        values = rng.standard_normal(p.shape) * scale
        if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
            values += 1.0
        p.data[...] = bk.asarray(values, dtype=p.dtype, backend=p.backend)

def backward_both(model, reference, idx, targets, mask) -> dict:
    """The masked loss of both models, checked equal; gradients left in place. Returns torch's params."""
    loss = model.loss(idx, targets, mask=mask)
    loss.backward()
    ref_loss = reference.loss(idx, targets, mask)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    return dict(reference.named_parameters())



@pytest.mark.parametrize("cfg_kwargs, batch", CONFIGS)
def test_whole_model_matches_torch(backend, cfg_kwargs, batch):
    rng = np.random.default_rng(sum(cfg_kwargs.values()))
    cfg = GPTConfig(**cfg_kwargs)
    model = GPT(cfg).to(dtype="float64")
    randomize(model, rng)
    T, V = cfg.block_size, cfg.vocab_size
    idx = rng.integers(0, V, size=(batch, T))
    targets = rng.integers(0, V, size=(batch, T))
    mask = (rng.random((batch, T)) < 0.6).astype(np.int64)
    mask[0, -1] = 1  # at least one counted position

    reference = build_torch_gpt(cfg, {n: bk.to_numpy(a) for n, a in model.state_dict().items()})
    assert sorted(n for n, _ in reference.named_parameters()) == sorted(model.state_dict())

    # logits
    logits = model(idx)
    ref_logits = reference(idx)
    assert rel_error(bk.to_numpy(logits.data), ref_logits.detach().numpy()) <= RTOL

    # masked loss and every parameter gradient
    ref_params = backward_both(model, reference, idx, targets, mask)
    scale = max(np.abs(p.grad.numpy()).max() for p in ref_params.values())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        grad, expected = bk.to_numpy(p.grad), ref_params[name].grad.numpy()
        if name.endswith("attn.k.bias"):
            # exactly 0: q·(k_j + b) shifts every score of a query by the same q·b, and softmax
            # ignores shifts; both sides hold only rounding noise, so compare with the global scale
            assert np.abs(grad).max() <= 1e-12 * scale and np.abs(expected).max() <= 1e-12 * scale
            continue
        err = rel_error(grad, expected)
        assert err <= RTOL, f"gradient of {name}: relative error {err:.3g} > {RTOL:g}"


def test_unmasked_loss_matches_torch():
    rng = np.random.default_rng(7)
    cfg = GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, d_model=8)
    model = GPT(cfg).to(dtype="float64")
    randomize(model, rng)
    idx, targets = rng.integers(0, 11, size=(2, 6)), rng.integers(0, 11, size=(2, 6))
    reference = build_torch_gpt(cfg, model.state_dict())
    assert rel_error(model.loss(idx, targets).item(), reference.loss(idx, targets).item()) <= RTOL


def test_torch_gpt_plugs_lora_branch():
    """The oracle's LoRA hook: W0 x + s·B A x on a chosen Linear (B = 0 leaves the model unchanged)."""
    rng = np.random.default_rng(3)
    cfg = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, d_model=8)
    model = GPT(cfg).to(dtype="float64")
    randomize(model, rng)
    state = model.state_dict()
    idx = rng.integers(0, 11, size=(2, 6))
    base = build_torch_gpt(cfg, state)(idx).detach().numpy()
    r, s = 2, 4.0
    A, B_zero = rng.standard_normal((r, 8)), np.zeros((8, r))
    zero_lora = build_torch_gpt(cfg, state, lora={"blocks.1.attn.q": (A, B_zero, s)})
    np.testing.assert_array_equal(zero_lora(idx).detach().numpy(), base)
    names = {n for n, _ in zero_lora.named_parameters()}
    assert {"blocks.1.attn.q.lora_A.0", "blocks.1.attn.q.lora_B.0", "blocks.1.attn.q.weight"} <= names
    B_rand = rng.standard_normal((8, r))
    lora = build_torch_gpt(cfg, state, lora={"blocks.0.attn.v": (A, B_rand, s)})
    # the same change written into W0 directly: W = W0 + s B A
    merged = dict(state)
    merged["blocks.0.attn.v.weight"] = state["blocks.0.attn.v.weight"] + s * B_rand @ A
    assert rel_error(lora(idx).detach().numpy(), build_torch_gpt(cfg, merged)(idx).detach().numpy()) <= 1e-12


@pytest.mark.parametrize("cfg_kwargs, batch", CONFIGS)
def test_whole_model_with_lora_on_q_v_matches_torch(backend, cfg_kwargs, batch):
    """Eq. 2 end to end: LoRA (r = 2) on Wq and Wv of every block, W0 frozen; the loss and every
    LoRA gradient equal the PyTorch model with the same low-rank branches."""
    from minilora import lora

    rng = np.random.default_rng(100 + sum(cfg_kwargs.values()))
    cfg = GPTConfig(**cfg_kwargs)
    model = GPT(cfg).to(dtype="float64")
    randomize(model, rng)
    base_state = {n: bk.to_numpy(a).copy() for n, a in model.state_dict().items()}
    config = lora.LoRAConfig(r=2, alpha=3.0, target_modules=("q", "v"))
    lora.apply_lora(model, config, adapter_name="task")
    lora.mark_only_lora_as_trainable(model)
    params = dict(model.named_parameters())
    branches = {}
    for name in params:
        if name.endswith(".lora_A.task"):
            module = name[: -len(".lora_A.task")]
            for p in (params[name], params[f"{module}.lora_B.task"]):  # host values moved to the model's backend
                p.data[...] = bk.asarray(rng.standard_normal(p.shape) * 0.5, dtype=p.dtype, backend=p.backend)
            branches[module] = (bk.to_numpy(params[name].data), bk.to_numpy(params[f"{module}.lora_B.task"].data), config.scaling)
    assert len(branches) == 2 * cfg.n_layer
    reference = build_torch_gpt(cfg, base_state, lora=branches)
    for n, p in reference.named_parameters():
        p.requires_grad_("lora_" in n)

    T, V = cfg.block_size, cfg.vocab_size
    idx, targets = rng.integers(0, V, size=(batch, T)), rng.integers(0, V, size=(batch, T))
    mask = (rng.random((batch, T)) < 0.6).astype(np.int64)
    mask[0, -1] = 1
    ref_params = backward_both(model, reference, idx, targets, mask)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} received a gradient"
            continue
        module, kind = name.rsplit(".lora_", 1)
        expected = ref_params[f"{module}.lora_{kind.split('.')[0]}.0"].grad.numpy()
        err = rel_error(bk.to_numpy(p.grad), expected)
        assert err <= RTOL, f"gradient of {name}: relative error {err:.3g} > {RTOL:g}"
