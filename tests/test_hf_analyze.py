"""``minilora analyze`` on PEFT LoRA folders of any architecture, without torch.

The folders are written here with ``safetensors.numpy`` under Llama and Phi names; every figure is
checked against a float64 NumPy computation of the dense ΔW = s·B·A, φ and the amplification
against the GPT-2 path on the same matrices, the base is read one tensor at a time (tracemalloc),
and every refusal names its file and field. The same against stock transformers and PEFT models
(Llama, Mistral, Qwen2) is in tests/oracle/test_hf_analyze.py.
"""

import json
import math
import os
import re
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minilora import hf, lora
from minilora.analysis import amplification_factor, subspace_similarity_grid
from minilora.cli import main
from minilora.hf import HFFormatError
from minilora.hf.analyze import analyze_adapter, read_lora_adapter
from minilora.models import GPT, GPTConfig

PRE = "base_model.model."
# a Llama-shaped model: d 24, 4 heads of 6 with 2 key/value heads (k, v map 24 -> 12), MLP 40
SHAPES = {"self_attn.q_proj": (24, 24), "self_attn.k_proj": (12, 24), "self_attn.v_proj": (12, 24),
          "self_attn.o_proj": (24, 24), "mlp.gate_proj": (40, 24), "mlp.up_proj": (40, 24), "mlp.down_proj": (24, 40)}


def _config(**fields) -> dict:
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": False,
           "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, "use_dora": False,
           "init_lora_weights": True, "base_model_name_or_path": None}
    cfg.update(fields)
    return cfg


def _write_adapter(folder, tensors: dict, **fields) -> str:
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(_config(**fields), f)
    return str(folder)


def _llama_adapter(folder, kinds=("self_attn.q_proj", "self_attn.v_proj"), layers=2, r=4, seed=0, ranks=None,
                   **fields):
    """Random A and B (B trained away from 0) for each kind in each layer; ``ranks``: {kind: r} (rank_pattern)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(layers):
        for kind in kinds:
            out_f, in_f = SHAPES[kind]
            R = (ranks or {}).get(kind, r)
            tensors[f"{PRE}model.layers.{i}.{kind}.lora_A.weight"] = rng.standard_normal((R, in_f)).astype(np.float32)
            tensors[f"{PRE}model.layers.{i}.{kind}.lora_B.weight"] = 0.1 * rng.standard_normal((out_f, R)).astype(np.float32)
    return _write_adapter(folder, tensors, r=r, **fields)


def _llama_base(folder, layers=2, seed=1, shards=1, dtype=np.float32) -> dict:
    """A Llama-named base (model.layers.N.<kind>.weight (out, in)); returns its float64 weights."""
    rng = np.random.default_rng(seed)
    weights = {f"model.layers.{i}.{kind}.weight": rng.standard_normal(shape)
               for i in range(layers) for kind, shape in SHAPES.items()}
    weights["model.embed_tokens.weight"] = rng.standard_normal((50, 24))
    os.makedirs(folder, exist_ok=True)
    names = sorted(weights)
    if shards == 1:
        save_file({n: weights[n].astype(dtype) for n in names}, os.path.join(folder, "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            save_file({n: weights[n].astype(dtype) for n in part}, os.path.join(folder, file))
            weight_map.update({n: file for n in part})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return {n: w.astype(dtype).astype(np.float64) for n, w in weights.items()}


def _dense(folder):
    """{module: (s·B·A in float64, A, s)} from the file, with the scaling from the config as PEFT computes it."""
    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    t = load_file(os.path.join(folder, "adapter_model.safetensors"))
    out = {}
    for key in t:
        if key.endswith(".lora_A.weight"):
            module = key[len(PRE):-len(".lora_A.weight")]
            a = t[key].astype(np.float64)
            b = t[key.replace("lora_A", "lora_B")].astype(np.float64)
            kind = module.split(".", 3)[3]
            last = kind.split(".")[-1]
            r = cfg["rank_pattern"].get(last, cfg["r"])
            alpha = cfg["alpha_pattern"].get(last, cfg["lora_alpha"])
            s = alpha / (math.sqrt(r) if cfg["use_rslora"] else r)
            out[module] = (s * b @ a, a, s)
    return out


def _check_row(row, delta, W0=None, phi=None):
    """Every figure of one row against the dense float64 ΔW (and W0; and φ of the pair of A matrices ``phi``)."""
    r = row["r"]
    sv = np.linalg.svd(delta, compute_uv=False)
    assert row["shape"] == list(delta.shape)
    assert abs(row["norm_delta_W"] - np.linalg.norm(delta)) <= 1e-12 * np.linalg.norm(delta)
    assert np.allclose(row["singular_values"], sv[:r], rtol=1e-10, atol=1e-13)
    share = np.cumsum(sv[:r] ** 2) / np.sum(sv ** 2)
    assert np.allclose(row["energy_share"], share, rtol=1e-10)
    assert row["rank_90"] == int(np.argmax(share >= 0.9 - 1e-12)) + 1
    if W0 is not None:
        assert abs(row["amplification"] - amplification_factor(delta, W0, r)) <= 1e-9 * row["amplification"]
        assert abs(row["norm_W"] - np.linalg.norm(W0)) <= 1e-12 * np.linalg.norm(W0)
    if phi is not None:
        assert np.allclose(row["phi_grid"], subspace_similarity_grid(*phi), atol=1e-12)


def test_every_figure_of_a_llama_adapter_matches_the_dense_float64_delta_w(tmp_path):
    """rank_pattern, alpha_pattern, all seven Llama kinds, a sharded float32 base: σ, ‖ΔW‖, shares, Table 7, φ."""
    kinds = tuple(SHAPES)
    fields = dict(rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3.0})
    ad = _llama_adapter(tmp_path / "a", kinds, ranks={"mlp.down_proj": 2}, **fields)
    other = _llama_adapter(tmp_path / "b", kinds, ranks={"mlp.down_proj": 2}, seed=5, **fields)
    W = _llama_base(tmp_path / "base", shards=3)
    report = analyze_adapter(ad, against=other, base=tmp_path / "base")
    dense, dense2 = _dense(ad), _dense(other)
    assert [r["matrix"] for r in report["rows"]] == [f"model.layers.{i}.{k}" for i in range(2) for k in kinds]
    for row in report["rows"]:
        delta, a, s = dense[row["matrix"]]
        assert row["scaling"] == s and row["layer"] == int(row["matrix"].split(".")[2])
        assert row["kind"] == row["matrix"].split(".", 3)[3]
        _check_row(row, delta, W[row["matrix"] + ".weight"], (a, dense2[row["matrix"]][1]))
    assert {r["matrix"]: r["r"] for r in report["rows"]}["model.layers.1.mlp.down_proj"] == 2
    assert {r["matrix"]: r["scaling"] for r in report["rows"]}["model.layers.0.self_attn.o_proj"] == 3.0 / 4
    by_kind = {g["kind"]: g for g in report["summary"]["by_kind"]}
    q = [r for r in report["rows"] if r["kind"] == "self_attn.q_proj"]
    assert by_kind["self_attn.q_proj"]["matrices"] == 2
    assert by_kind["self_attn.q_proj"]["amplification"] == pytest.approx(np.mean([r["amplification"] for r in q]))
    assert [g["layer"] for g in report["summary"]["by_layer"]] == [0, 1]
    assert report["summary"]["by_layer"][1]["phi_1_1"] == pytest.approx(
        np.mean([r["phi_1_1"] for r in report["rows"] if r["layer"] == 1]))


def test_rslora_and_a_phi_style_bfloat16_base(tmp_path):
    """s = alpha/√r under use_rslora; Phi's names (fc1, fc2, dense) and a bfloat16 base read exactly."""
    rng = np.random.default_rng(3)
    tensors, base = {}, {}
    for kind, (out_f, in_f) in (("self_attn.dense", (24, 24)), ("mlp.fc1", (40, 24)), ("mlp.fc2", (24, 40))):
        tensors[f"{PRE}model.layers.0.{kind}.lora_A.weight"] = rng.standard_normal((8, in_f))
        tensors[f"{PRE}model.layers.0.{kind}.lora_B.weight"] = 0.1 * rng.standard_normal((out_f, 8))
        w = rng.standard_normal((out_f, in_f)).astype(np.float32)
        base[f"model.layers.0.{kind}.weight"] = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)  # bf16-exact
    ad = _write_adapter(tmp_path / "phi", tensors, r=8, lora_alpha=16, use_rslora=True)
    os.makedirs(tmp_path / "phi-base")
    header = {n: {"dtype": "BF16", "shape": list(w.shape)} for n, w in base.items()}
    blob, offset = b"", 0
    for n, w in base.items():
        raw = (w.view(np.uint32) >> 16).astype("<u2").tobytes()
        header[n]["data_offsets"] = [offset, offset + len(raw)]
        blob, offset = blob + raw, offset + len(raw)
    head = json.dumps(header).encode()
    with open(tmp_path / "phi-base" / "model.safetensors", "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + blob)
    report = analyze_adapter(ad, base=tmp_path / "phi-base")
    assert [r["kind"] for r in report["rows"]] == ["self_attn.dense", "mlp.fc1", "mlp.fc2"]
    for row in report["rows"]:
        a, b = (tensors[f"{PRE}{row['matrix']}.lora_{p}.weight"] for p in "AB")
        assert row["scaling"] == 16 / math.sqrt(8)
        _check_row(row, row["scaling"] * b @ a, base[row["matrix"] + ".weight"].astype(np.float64))


def _tiny_gpt2(tmp_path, seed):
    cfg = GPTConfig(vocab_size=31, block_size=8, n_layer=2, n_head=2, d_model=16)
    model = GPT(cfg)
    model.to(dtype="float64")
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    return model


def test_phi_spectrum_and_amplification_agree_with_the_gpt2_path(tmp_path, capsys):
    """The same A and B read three ways: the GPT-2 path (through the model), the name-only reader on the GPT-2
    folder (Conv1D base tensors stored (in, out): fan_in_fan_out), and the same matrices under Llama's names."""
    base = _tiny_gpt2(tmp_path, 0)
    hf.save_gpt2(tmp_path / "gpt2", base)
    for name, seed in (("one", 1), ("two", 2)):
        model = _tiny_gpt2(tmp_path, 0)
        lora.apply_lora(model, lora.LoRAConfig(r=3, alpha=6.0, target_modules=("o", "fc", "proj")))
        rng = np.random.default_rng(seed)
        for _, layer in lora.lora_layers(model):
            layer.lora_A["default"].data[...] = rng.standard_normal(layer.lora_A["default"].shape)
            layer.lora_B["default"].data[...] = rng.standard_normal(layer.lora_B["default"].shape)
        hf.save_peft_adapter(tmp_path / name, model)
    assert main(["analyze", str(tmp_path / "one"), "--against", str(tmp_path / "two"), "--base", str(tmp_path / "gpt2"),
                 "--out", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "analyze.json") as f:
        gpt2_rows = {r["matrix"]: r for r in json.load(f)["rows"]}
    assert "means by module kind" in capsys.readouterr().out
    ours = {"attn.c_proj": "attn.o", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    by_names = analyze_adapter(tmp_path / "one", against=tmp_path / "two", base=tmp_path / "gpt2")
    assert by_names["config"]["fan_in_fan_out"] is True and len(by_names["rows"]) == 6
    # the same tensors under Llama's names, with a base stored (out, in) as a Linear stores it
    llama, base_t = {}, {}
    names = {"attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
    params = dict(base.named_parameters())
    for which in ("one", "two"):
        t = load_file(tmp_path / which / "adapter_model.safetensors")
        llama[which] = {k.replace("transformer.h.", "model.layers.").replace(gpt2_name, llama_name): v
                        for k, v in t.items() for gpt2_name, llama_name in names.items() if gpt2_name in k}
        with open(tmp_path / which / "adapter_config.json") as f:
            cfg = json.load(f)
        _write_adapter(tmp_path / f"llama-{which}", llama[which], r=cfg["r"], lora_alpha=cfg["lora_alpha"])
    for i in range(2):
        for gpt2_name, llama_name in names.items():
            base_t[f"model.layers.{i}.{llama_name}.weight"] = np.ascontiguousarray(
                params[f"blocks.{i}.{ours[gpt2_name]}.weight"].data)
    os.makedirs(tmp_path / "llama-base")
    save_file(base_t, tmp_path / "llama-base" / "model.safetensors")
    renamed = analyze_adapter(tmp_path / "llama-one", against=tmp_path / "llama-two", base=tmp_path / "llama-base")
    twins = {r["matrix"]: r for r in renamed["rows"]}
    assert len(twins) == 6
    for row in by_names["rows"]:
        layer, kind = row["layer"], row["kind"]
        g = gpt2_rows[f"blocks.{layer}.{ours[kind]}"]
        twin = twins[f"model.layers.{layer}.{names[kind]}"]
        for r in (row, twin):
            assert r["shape"] == g["shape"] and r["r"] == g["r"] == 3 and r["scaling"] == g["scaling"] == 2.0
            assert np.allclose(r["singular_values"], g["singular_values"], rtol=1e-13, atol=0)
            assert np.allclose(r["phi_grid"], g["phi_grid"], rtol=0, atol=1e-13)
            assert abs(r["amplification"] - g["amplification"]) <= 1e-10 * g["amplification"]
            assert np.allclose(r["energy_share"], g["energy_share"], rtol=1e-12) and r["rank_90"] == g["rank_90"]


def test_the_base_is_read_one_tensor_at_a_time(tmp_path):
    """Peak Python memory (tracemalloc) while analysing 8 matrices of 4 MB stays near one matrix, not eight."""
    d, k = 1024, 1024
    rng = np.random.default_rng(0)
    tensors, weight_map = {}, {}
    os.makedirs(tmp_path / "base")
    for i in range(4):
        part = {}
        for kind in ("q_proj", "v_proj"):
            tensors[f"{PRE}model.layers.{i}.self_attn.{kind}.lora_A.weight"] = rng.standard_normal((4, k)).astype(np.float32)
            tensors[f"{PRE}model.layers.{i}.self_attn.{kind}.lora_B.weight"] = rng.standard_normal((d, 4)).astype(np.float32)
            part[f"model.layers.{i}.self_attn.{kind}.weight"] = rng.standard_normal((d, k)).astype(np.float32)
        file = f"model-{i + 1:05d}-of-00004.safetensors"
        save_file(part, tmp_path / "base" / file)
        weight_map.update({n: file for n in part})
    with open(tmp_path / "base" / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": weight_map}, f)
    ad = _write_adapter(tmp_path / "ad", tensors)
    matrix = d * k * 4  # bytes of one float32 base matrix
    analyze_adapter(ad, base=tmp_path / "base")  # warm: imports and caches outside the measurement
    tracemalloc.start()
    try:
        report = analyze_adapter(ad, base=tmp_path / "base")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(report["rows"]) == 8 and all(np.isfinite(r["amplification"]) for r in report["rows"])
    assert peak < 1.5 * matrix, f"peak {peak / matrix:.2f} base matrices"


# ----------------------------------------------------------------------------- refusals
def _break(tmp_path, how):
    """A Llama adapter and base, broken one way; returns (argv, pattern the error must match)."""
    ad = _llama_adapter(tmp_path / "ad")
    _llama_base(tmp_path / "base")
    weights, config = os.path.join(ad, "adapter_model.safetensors"), os.path.join(ad, "adapter_config.json")
    weights_re, config_re = re.escape(weights), re.escape(config)
    t = load_file(weights)
    argv = [ad, "--base", str(tmp_path / "base")]
    if how == "peft_type":
        _write_adapter(ad, t, peft_type="IA3")
        return argv, rf"{config_re}: peft_type = 'IA3'"
    if how == "bin":
        os.remove(weights)
        open(os.path.join(ad, "adapter_model.bin"), "wb").close()
        return argv, r"adapter_model\.bin: a pickle"
    if how == "unpaired":
        del t[f"{PRE}model.layers.1.self_attn.v_proj.lora_B.weight"]
        save_file(t, weights)
        return argv, rf"{weights_re}: {PRE}model\.layers\.1\.self_attn\.v_proj\.lora_A\.weight has no lora_B"
    if how == "rank":
        _write_adapter(ad, t, rank_pattern={"v_proj": 2})
        return argv, rf"{weights_re}: .*v_proj\.lora_A\.weight has rank 4, but {config_re} gives .* rank_pattern\['v_proj'\] = 2"
    if how == "r":
        _write_adapter(ad, t, r=8)
        return argv, rf"{weights_re}: .*q_proj\.lora_A\.weight has rank 4, but {config_re} gives .* r = 8"
    if how == "embedding":
        t[f"{PRE}model.embed_tokens.lora_embedding_A"] = np.ones((4, 50), np.float32)
        save_file(t, weights)
        return argv, rf"{weights_re}: {PRE}model\.embed_tokens\.lora_embedding_A — a LoRA on an embedding"
    base_file = str(tmp_path / "base" / "model.safetensors")
    base_re = re.escape(base_file)
    b = load_file(base_file)
    if how == "base missing":
        del b["model.layers.1.self_attn.q_proj.weight"]
        save_file(b, base_file)
        return argv, rf"{base_re}: no tensor model\.layers\.1\.self_attn\.q_proj\.weight"
    if how == "base shape":
        b["model.layers.0.self_attn.v_proj.weight"] = np.ones((24, 24), np.float32)
        save_file(b, base_file)
        return argv, rf"{base_re}: model\.layers\.0\.self_attn\.v_proj\.weight has shape \(24, 24\), .* maps 24 -> 12"
    if how == "base bin":
        os.remove(base_file)
        open(tmp_path / "base" / "pytorch_model.bin", "wb").close()
        return argv, r"pytorch_model\.bin \(a pickle"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["peft_type", "bin", "unpaired", "rank", "r", "embedding", "base missing",
                                 "base shape", "base bin"])
def test_refusals_name_the_file_and_the_field(tmp_path, capsys, how):
    argv, pattern = _break(tmp_path, how)
    with pytest.raises(HFFormatError, match=pattern):
        analyze_adapter(argv[0], base=argv[2])
    assert main(["analyze", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minilora analyze: error: ") and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_dora_magnitude_is_reported_and_a_rewritten_base_is_named(tmp_path, capsys):
    """DoRA: ‖m‖ and, with W0, ‖m ⊙ V/‖V‖_row − W0‖_F in float64; init 'pissa' is named in the output."""
    ad = _llama_adapter(tmp_path / "dora", use_dora=True)
    W = _llama_base(tmp_path / "base")
    t = load_file(os.path.join(ad, "adapter_model.safetensors"))
    rng = np.random.default_rng(7)
    for key in [k for k in t if k.endswith("lora_A.weight")]:
        module = key[len(PRE):-len(".lora_A.weight")]
        t[f"{PRE}{module}.lora_magnitude_vector"] = (1 + rng.random(t[key.replace("lora_A", "lora_B")].shape[0])) \
            .astype(np.float32)
    _write_adapter(ad, t, use_dora=True)
    report = analyze_adapter(ad, base=tmp_path / "base")
    for row in report["rows"]:
        m = t[f"{PRE}{row['matrix']}.lora_magnitude_vector"].astype(np.float64)
        W0 = W[row["matrix"] + ".weight"]
        V = W0 + row["scaling"] * t[f"{PRE}{row['matrix']}.lora_B.weight"].astype(np.float64) \
            @ t[f"{PRE}{row['matrix']}.lora_A.weight"].astype(np.float64)
        merged = m[:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)
        assert row["update"].startswith("DoRA")
        assert row["magnitude"]["norm"] == pytest.approx(np.linalg.norm(m), rel=1e-12)
        assert row["norm_weight_change"] == pytest.approx(np.linalg.norm(merged - W0), rel=1e-12)
        assert row["magnitude"]["ratio_to_row_norm"]["max"] == pytest.approx(np.max(m / np.linalg.norm(V, axis=1)))
    del t[f"{PRE}model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    _write_adapter(ad, t, use_dora=True)
    with pytest.raises(HFFormatError, match="says use_dora, but model.layers.0.self_attn.q_proj has no lora_magn"):
        read_lora_adapter(ad)
    pissa = _llama_adapter(tmp_path / "pissa", init_lora_weights="pissa_niter_4")
    assert main(["analyze", pissa, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "init_lora_weights = 'pissa_niter_4' rewrote the base" in out and "no base weights" in out


def test_cli_analyze_a_llama_adapter_against_another(tmp_path, capsys):
    """The table, the means by kind and by depth, analyze.json and the PNG; base_model_name_or_path is used."""
    _llama_base(tmp_path / "base", shards=2)
    ad = _llama_adapter(tmp_path / "a", base_model_name_or_path=str(tmp_path / "base"))
    other = _llama_adapter(tmp_path / "b", kinds=("self_attn.q_proj",), seed=4)
    assert main(["analyze", ad, "--against", other, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"base weights from {tmp_path / 'base'}" in out
    assert "model.layers.1.self_attn.v_proj" in out and "means by module kind" in out and "means by depth" in out
    assert "φ for the 2 of 4 modules" in out
    with open(tmp_path / "out" / "analyze.json") as f:
        saved = json.load(f)
    assert [("phi_grid" in r) for r in saved["rows"]] == [True, False, True, False]
    assert all(np.isfinite(r["amplification"]) for r in saved["rows"])
    assert [g["kind"] for g in saved["summary"]["by_kind"]] == ["self_attn.q_proj", "self_attn.v_proj"]
    png = tmp_path / "out" / "analyze.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()
    else:
        assert png.read_bytes()[:4] == b"\x89PNG"
