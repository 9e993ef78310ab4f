"""The variants against PEFT itself (``peft.get_peft_model`` on a torch Module of two nn.Linear layers).

PEFT wraps any torch Module whose targets are nn.Linear, so the same weights go into a tiny torch
model and into the same model written with minilora; float64 throughout:
- DoRA (``use_dora=True``): the magnitude's start, the forward, and the gradients of A, B and m
  with the detached norm (PEFT's definition); our exact gradient differs from it, as it must;
  the merged weight of ``merge_and_unload``.
- rsLoRA: PEFT's scaling α/√r and the forward.
- PiSSA (``init_lora_weights="pissa"``): s·B·A, the residual W_res and the unchanged output;
  and the rank-2r conversion of ``save_pretrained(path_initial_model_for_weight_conversion=...)``.
"""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch oracle not installed: pip install torch")
peft = pytest.importorskip("peft", reason="PEFT oracle not installed: pip install peft")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors not installed")

import minilora as ml  # noqa: E402
from minilora import lora, nn  # noqa: E402

TOL = 1e-10
K, HIDDEN, D = 6, 5, 4  # inp: 6 -> 5, out: 5 -> 4


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(K, HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, D)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


class OurNet(nn.Module):
    def __init__(self, dtype=np.float64):
        super().__init__()
        self.inp = nn.Linear(K, HIDDEN, dtype=dtype)
        self.out = nn.Linear(HIDDEN, D, dtype=dtype)

    def forward(self, x):
        return self.out(self.inp(x).tanh())


def twins(seed=0, dtype="float64"):
    """A torch net and our net with the same base weights (float64, or float32 where PEFT insists)."""
    torch.manual_seed(seed)
    theirs = TorchNet().double() if dtype == "float64" else TorchNet()
    ours = OurNet(np.dtype(dtype))
    params = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        params[name].data[...] = p.detach().numpy()
    return theirs, ours


def peft_model(theirs, **config):
    cfg = peft.LoraConfig(target_modules=["inp", "out"], lora_dropout=0.0, **config)
    model = peft.get_peft_model(theirs, cfg)
    return model.double() if theirs.inp.weight.dtype == torch.float64 else model


def peft_layer(model, name):
    return getattr(model.base_model.model, name)


def copy_adapter(model, ours, rng, dora=False):
    """Random A, B (and m) into both: B = 0 and m = ‖W₀‖ would hide every bug."""
    for name in ("inp", "out"):
        layer, mine = peft_layer(model, name), dict(lora.lora_layers(ours))[name]
        for theirs_w, our_p in ((layer.lora_A["default"].weight, mine.lora_A["default"]),
                                (layer.lora_B["default"].weight, mine.lora_B["default"])):
            values = rng.standard_normal(theirs_w.shape) * 0.4
            with torch.no_grad():
                theirs_w.copy_(torch.from_numpy(values))
            our_p.data[...] = values
        if dora:
            m = layer.lora_magnitude_vector["default"].weight
            values = m.detach().numpy() * rng.uniform(0.7, 1.3, m.shape)
            with torch.no_grad():
                m.copy_(torch.from_numpy(values))
            mine.lora_magnitude["default"].data[...] = values


def inputs(seed=1, dtype="float64"):
    return np.random.default_rng(seed).standard_normal((3, 2, K)).astype(dtype)


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0))


# ----------------------------------------------------------------------------- DoRA
def test_dora_magnitude_starts_at_peft_s_row_norms():
    theirs, ours = twins()
    model = peft_model(theirs, r=2, lora_alpha=4, use_dora=True)
    lora.apply_lora(ours, lora.LoRAConfig(r=2, alpha=4, target_modules=("inp", "out"), use_dora=True))
    for name in ("inp", "out"):
        peft_m = peft_layer(model, name).lora_magnitude_vector["default"].weight.detach().numpy()
        our_m = dict(lora.lora_layers(ours))[name].lora_magnitude["default"].data
        assert rel(our_m, peft_m) < 1e-14


def test_dora_forward_gradients_and_merge_equal_peft():
    theirs, ours = twins()
    model = peft_model(theirs, r=2, lora_alpha=4, use_dora=True)
    lora.apply_lora(ours, lora.LoRAConfig(r=2, alpha=4, target_modules=("inp", "out"), use_dora=True,
                                          dora_detach_norm=True))
    lora.mark_only_lora_as_trainable(ours)
    copy_adapter(model, ours, np.random.default_rng(2), dora=True)
    x = inputs()
    g = np.random.default_rng(3).standard_normal((3, 2, D))
    h_theirs = model(torch.from_numpy(x))
    (h_theirs * torch.from_numpy(g)).sum().backward()
    h_ours = ours(ml.tensor(x, dtype="float64"))
    h_ours.backward(g)
    assert rel(h_ours.data, h_theirs.detach().numpy()) < TOL
    for name in ("inp", "out"):
        layer, mine = peft_layer(model, name), dict(lora.lora_layers(ours))[name]
        pairs = [(layer.lora_A["default"].weight, mine.lora_A["default"]),
                 (layer.lora_B["default"].weight, mine.lora_B["default"]),
                 (layer.lora_magnitude_vector["default"].weight, mine.lora_magnitude["default"])]
        for theirs_w, our_p in pairs:
            assert rel(our_p.grad, theirs_w.grad.numpy()) < TOL, name

    # the exact gradient (our default) differs from PEFT's in A and B, not in m
    exact = copy.deepcopy(ours)
    exact.zero_grad()
    for _, layer in lora.lora_layers(exact):
        layer.lora_config["default"] = dataclasses.replace(layer.lora_config["default"], dora_detach_norm=False)
    exact(ml.tensor(x, dtype="float64")).backward(g)
    mine, exact_layer = dict(lora.lora_layers(ours))["inp"], dict(lora.lora_layers(exact))["inp"]
    assert rel(exact_layer.lora_A["default"].grad, mine.lora_A["default"].grad) > 1e-6
    assert rel(exact_layer.lora_magnitude["default"].grad, mine.lora_magnitude["default"].grad) < TOL

    merged = model.merge_and_unload()
    ours.eval()
    lora.merge(ours)
    for name in ("inp", "out"):
        assert rel(dict(lora.lora_layers(ours))[name].weight.data, getattr(merged, name).weight.detach().numpy()) < TOL


# ----------------------------------------------------------------------------- rsLoRA
@pytest.mark.parametrize("r", [1, 4])
def test_rslora_scaling_and_forward_equal_peft(r):
    theirs, ours = twins()
    model = peft_model(theirs, r=r, lora_alpha=8, use_rslora=True)
    cfg = lora.LoRAConfig(r=r, alpha=8, target_modules=("inp", "out"), use_rslora=True)
    lora.apply_lora(ours, cfg)
    assert peft_layer(model, "inp").scaling["default"] == pytest.approx(cfg.scaling, rel=1e-15)
    assert cfg.scaling == 8 / math.sqrt(r)
    copy_adapter(model, ours, np.random.default_rng(4))
    x = inputs()
    assert rel(ours(ml.tensor(x, dtype="float64")).data, model(torch.from_numpy(x)).detach().numpy()) < TOL


# ----------------------------------------------------------------------------- PiSSA
PISSA_TOL = 1e-5  # PEFT refuses PiSSA in float64: its SVD runs in float32, ours in float64 then rounds


def test_pissa_init_equals_peft():
    theirs, ours = twins(dtype="float32")
    x = inputs(dtype="float32")
    base_out = theirs(torch.from_numpy(x)).detach().numpy()
    model = peft_model(theirs, r=2, lora_alpha=4, init_lora_weights="pissa")
    cfg = lora.LoRAConfig(r=2, alpha=4, target_modules=("inp", "out"), init="pissa")
    lora.apply_lora(ours, cfg)
    for name in ("inp", "out"):
        layer, mine = peft_layer(model, name), dict(lora.lora_layers(ours))[name]
        A, Bm = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
        ours_delta = cfg.scaling * mine.lora_B["default"].data @ mine.lora_A["default"].data
        assert rel(ours_delta, cfg.scaling * Bm @ A) < PISSA_TOL  # singular vectors' signs may differ; s·B·A not
        assert rel(mine.weight.data, layer.base_layer.weight.detach().numpy()) < PISSA_TOL  # the residual W_res
    assert rel(ours(ml.tensor(x, dtype="float32")).data, base_out) < PISSA_TOL
    assert rel(model(torch.from_numpy(x)).detach().numpy(), base_out) < PISSA_TOL


def test_pissa_conversion_equals_peft_save_with_weight_conversion(tmp_path):
    theirs, ours = twins(dtype="float32")
    model = peft_model(theirs, r=2, lora_alpha=4, init_lora_weights="pissa")
    cfg = lora.LoRAConfig(r=2, alpha=4, target_modules=("inp", "out"), init="pissa")
    lora.apply_lora(ours, cfg)
    # PEFT's recipe: save the untrained PiSSA adapter with init_lora_weights=True, train, save converted
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = "pissa"
    rng = np.random.default_rng(5)
    for name in ("inp", "out"):  # "training": the same step added to both sides' A and B
        layer, mine = peft_layer(model, name), dict(lora.lora_layers(ours))[name]
        theirs_A, theirs_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        # two SVDs may flip the sign of a singular pair (u_i, v_i): apply the steps in matching frames
        sign = np.sign(np.sum(theirs_A.detach().numpy() * mine.lora_A["default"].data, axis=1))  # (r,)
        step_A = (rng.standard_normal(theirs_A.shape) * 0.1).astype(np.float32)
        step_B = (rng.standard_normal(theirs_B.shape) * 0.1).astype(np.float32)
        with torch.no_grad():
            theirs_A.add_(torch.from_numpy(step_A))
            theirs_B.add_(torch.from_numpy(step_B))
        mine.lora_A["default"].data[...] += step_A * sign[:, None]
        mine.lora_B["default"].data[...] += step_B * sign[None, :]
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    peft_cfg = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    tensors = safetensors_torch.load_file(str(tmp_path / "converted" / "adapter_model.safetensors"))
    plain = lora.pissa_to_lora(ours, "default")
    converted = lora.get_adapter_config(plain, "default")
    assert (converted.r, converted.alpha) == (peft_cfg["r"], peft_cfg["lora_alpha"]) == (4, 8.0)
    for name in ("inp", "out"):
        A = tensors[f"base_model.model.{name}.lora_A.weight"].numpy()
        Bm = tensors[f"base_model.model.{name}.lora_B.weight"].numpy()
        mine = dict(lora.lora_layers(plain))[name]
        ours_delta = mine.lora_B["default"].data @ mine.lora_A["default"].data
        assert rel(ours_delta, Bm @ A) < PISSA_TOL, name  # ΔW = B·A − B₀·A₀ as a rank-2r product


# ----------------------------------------------------------------------------- DoRA through minilora.hf
@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v", "o", "fc", "proj")], ids=["q,v", "all six"])
def test_dora_adapter_exported_with_hf_loads_in_peft_with_equal_logits_and_merge(tmp_path, targets):
    """``hf.save_peft_adapter`` of a DoRA adapter -> ``PeftModel.from_pretrained`` on GPT2LMHeadModel: equal logits.

    PEFT normalises the rows of the whole fused c_attn; with q, v only, the k rows must come out as the base's.
    """
    transformers = pytest.importorskip("transformers", reason="the Hugging Face oracle needs transformers")
    from minilora import hf

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=29, n_positions=12, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.1 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "gpt2")
    model = hf.load_gpt2(tmp_path / "gpt2", dtype="float64")
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4.0, target_modules=targets, use_dora=True))
    rng = np.random.default_rng(3)
    for _, layer in lora.lora_layers(model):
        layer.lora_A["default"].data[...] = 0.3 * rng.standard_normal(layer.lora_A["default"].shape)
        layer.lora_B["default"].data[...] = 0.3 * rng.standard_normal(layer.lora_B["default"].shape)
        layer.lora_magnitude["default"].data[...] *= rng.uniform(0.7, 1.3, layer.out_features)
    hf.save_peft_adapter(tmp_path / "adapter", model)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    peft_model = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2", dtype=torch.float64).eval(),
        tmp_path / "adapter").eval()
    idx = np.random.default_rng(5).integers(0, 29, (2, 12))
    model.eval()
    with ml.no_grad():
        ours = np.asarray(model(idx).data)
    with torch.no_grad():
        theirs = peft_model(torch.tensor(idx)).logits.numpy()
        plain = base(torch.tensor(idx)).logits.numpy()
    assert rel(ours, plain) > 1e-3  # the adapter does something
    assert rel(ours, theirs) < TOL
    merged = peft_model.merge_and_unload()
    lora.merge(model)
    with ml.no_grad(), torch.no_grad():
        assert rel(np.asarray(model(idx).data), merged(torch.tensor(idx)).logits.numpy()) < TOL
