"""``minilora analyze`` on adapters made by stock PEFT for tiny Llama, Mistral and Qwen2 models (offline).

Each model is built from a tiny transformers config and saved with ``save_pretrained`` (Llama as one
float32 file, Mistral sharded, Qwen2 in bfloat16); PEFT's ``get_peft_model`` adapts it, B is set to
random values (PEFT starts B at 0), and ``save_pretrained`` writes the adapter. The oracle is PEFT's
own model: its module names, its ``scaling`` per layer, its lora_A / lora_B and the base weights,
from which every figure is computed in float64 on the dense ΔW; ``get_delta_weight`` checks that
s·B·A is the update PEFT applies. DoRA's whole weight change comes from PEFT's ``merge_and_unload``.
"""

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PEFT oracle needs torch")
transformers = pytest.importorskip("transformers", reason="the PEFT oracle needs transformers")
peft = pytest.importorskip("peft", reason="the PEFT oracle needs peft")

from minilora.analysis import amplification_factor, subspace_similarity_grid  # noqa: E402
from minilora.cli import main  # noqa: E402
from minilora.hf.analyze import analyze_adapter  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCHS = {  # model class, config class, LoraConfig, how the base is saved
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
              dict(dtype=None, max_shard_size=None)),
    "mistral": ("MistralForCausalLM", "MistralConfig",
                dict(r=4, lora_alpha=8, target_modules=ALL, rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3}),
                dict(dtype=None, max_shard_size="20KB")),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config",
              dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True),
              dict(dtype=torch.bfloat16, max_shard_size=None)),
}


def _quiet():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _lora_layers(model):
    """{module name as PEFT's file names it: PEFT's LoRA layer}."""
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and "default" in m.lora_A}


def _adapter(model, lora_kwargs, folder, seed, dora=False):
    torch.manual_seed(seed)
    adapted = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**lora_kwargs, use_dora=dora))
    with torch.no_grad():
        for layer in _lora_layers(adapted).values():
            layer.lora_B["default"].weight.normal_(0.0, 0.1)  # trained away from PEFT's B = 0
            if dora:
                layer.lora_magnitude_vector["default"].weight.mul_(1.0 + 0.2 * torch.rand_like(
                    layer.lora_magnitude_vector["default"].weight))
    adapted.save_pretrained(folder)
    return adapted


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, tmp_path_factory):
    _quiet()
    model_cls, config_cls, lora_kwargs, save = ARCHS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**TINY)).eval()
    if save["dtype"] is not None:  # the base file holds bfloat16; the oracle reads the same rounded weights
        model.to(save["dtype"])
        model.save_pretrained(tmp / "base")
        model.to(torch.float32)
    else:
        model.save_pretrained(tmp / "base", **({"max_shard_size": save["max_shard_size"]} if save["max_shard_size"] else {}))
    one = _adapter(model, lora_kwargs, tmp / "one", seed=1)
    two = _adapter(model, lora_kwargs, tmp / "two", seed=2)
    return request.param, tmp, _lora_layers(one), _lora_layers(two)


def _f64(t):
    return t.detach().to(torch.float64).numpy()


def test_every_figure_against_peft_and_the_dense_float64_delta_w(arch, tmp_path, capsys):
    name, tmp, layers, layers2 = arch
    if name == "mistral":
        assert (tmp / "base" / "model.safetensors.index.json").exists()
    if name == "qwen2":
        with open(tmp / "base" / "config.json") as f:
            assert json.load(f)["dtype"] == "bfloat16"
    report = analyze_adapter(tmp / "one", against=tmp / "two", base=tmp / "base")
    assert sorted(r["matrix"] for r in report["rows"]) == sorted(layers)
    for row in report["rows"]:
        layer = layers[row["matrix"]]
        A, B, s = _f64(layer.lora_A["default"].weight), _f64(layer.lora_B["default"].weight), layer.scaling["default"]
        W0 = _f64(layer.get_base_layer().weight)
        delta = s * B @ A
        with torch.no_grad():  # s·B·A is the update PEFT adds to this Linear's (out, in) weight
            assert np.allclose(_f64(layer.get_delta_weight("default")), delta, rtol=1e-5, atol=1e-7)
        r = A.shape[0]
        sv = np.linalg.svd(delta, compute_uv=False)
        share = np.cumsum(sv[:r] ** 2) / np.sum(sv ** 2)
        assert row["shape"] == list(W0.shape) and row["r"] == r
        assert row["scaling"] == pytest.approx(s, rel=1e-15)
        assert row["norm_delta_W"] == pytest.approx(np.linalg.norm(delta), rel=1e-12)
        assert np.allclose(row["singular_values"], sv[:r], rtol=1e-10, atol=1e-14)
        assert np.allclose(row["energy_share"], share, rtol=1e-10)
        assert row["rank_90"] == int(np.argmax(share >= 0.9 - 1e-12)) + 1
        assert row["amplification"] == pytest.approx(amplification_factor(delta, W0, r), rel=1e-9)
        A2 = _f64(layers2[row["matrix"]].lora_A["default"].weight)
        assert np.allclose(row["phi_grid"], subspace_similarity_grid(A, A2), rtol=0, atol=1e-12)
    kinds = {r["matrix"].split(".", 3)[3] for r in report["rows"]}
    assert {g["kind"] for g in report["summary"]["by_kind"]} == kinds
    assert [g["layer"] for g in report["summary"]["by_layer"]] == [0, 1]
    if name == "mistral":  # rank_pattern and alpha_pattern as PEFT applied them
        by = {r["matrix"]: r for r in report["rows"]}
        assert by["model.layers.0.mlp.down_proj"]["r"] == 2 and by["model.layers.0.self_attn.o_proj"]["scaling"] == 0.75
    if name == "qwen2":
        assert report["rows"][0]["scaling"] == pytest.approx(16 / np.sqrt(8), rel=1e-15)
    # the command line gives the same report
    assert main(["analyze", str(tmp / "one"), "--against", str(tmp / "two"), "--base", str(tmp / "base"),
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in layers) and "means by module kind" in out and "φ(1,1)" in out
    with open(tmp_path / "analyze.json") as f:
        assert json.load(f)["rows"] == json.loads(json.dumps(report["rows"]))


def test_dora_magnitude_and_weight_change_against_peft_merge(tmp_path):
    """PEFT's DoRA in float64: ‖m‖, and ‖W′ − W0‖_F with W′ from PEFT's merge_and_unload."""
    _quiet()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).double().eval()
    model.save_pretrained(tmp_path / "base")
    W0 = {n.removesuffix(".weight"): _f64(p) for n, p in model.named_parameters()}
    adapted = _adapter(model, dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]), tmp_path / "dora",
                       seed=3, dora=True)
    magnitudes = {n: _f64(layer.lora_magnitude_vector["default"].weight) for n, layer in _lora_layers(adapted).items()}
    merged = {n.removesuffix(".weight"): _f64(p) for n, p in adapted.merge_and_unload().named_parameters()}
    report = analyze_adapter(tmp_path / "dora", base=tmp_path / "base")
    assert len(report["rows"]) == 4
    for row in report["rows"]:
        n = row["matrix"]
        assert row["update"].startswith("DoRA")
        assert row["magnitude"]["norm"] == pytest.approx(np.linalg.norm(magnitudes[n]), rel=1e-12)
        assert row["norm_weight_change"] == pytest.approx(np.linalg.norm(merged[n] - W0[n]), rel=1e-10)
