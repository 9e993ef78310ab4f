"""minilora.hf without torch: file layouts, round trips, every error path, and the tokenizer.

Hugging Face GPT-2 folders are made here by ``hf.save_gpt2`` and rewritten by hand (no prefix,
shards, bfloat16, edited configs); PEFT folders by ``hf.save_peft_adapter`` and then broken on
purpose. A failed load must leave the model bit-identical. The comparisons with stock
transformers and PEFT are in tests/oracle/test_hf.py.
"""

import json
import os
import re
import subprocess
import sys

import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import minilora as ml
from minilora import hf, lora
from minilora.hf import HFFormatError
from minilora.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=41, block_size=12, n_layer=2, n_head=2, d_model=16)


def _model(dtype="float64", seed=0) -> GPT:
    ml.manual_seed(seed)
    model = GPT(CFG)
    model.to(dtype=dtype)
    rng = np.random.default_rng(seed)
    for p in model.parameters():  # biases and LayerNorms away from 0 and 1
        p.data[...] += (0.1 * rng.standard_normal(p.shape)).astype(dtype)
    return model


def _logits(model, seed=0):
    idx = np.random.default_rng(seed).integers(0, CFG.vocab_size, (2, CFG.block_size))
    model.eval()
    with ml.no_grad():
        return np.asarray(model(idx).data)


def _state(model) -> dict:
    return {n: np.array(a, copy=True) for n, a in model.state_dict().items()}


def _same(model, before: dict) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(np.array_equal(after[n], before[n]) for n in before)


@pytest.fixture
def gpt2_dir(tmp_path):
    model = _model()
    hf.save_gpt2(tmp_path / "gpt2", model)
    return tmp_path / "gpt2", model


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


# ----------------------------------------------------------------------------- GPT-2 folders
def test_import_minilora_hf_pulls_in_no_torch_transformers_or_tokenizers():
    code = ("import sys, minilora, minilora.hf; bad = [m for m in ('torch', 'transformers', 'tokenizers', 'peft') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_save_then_load_is_bit_exact_and_keeps_float64(gpt2_dir):
    folder, model = gpt2_dir
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    assert all(a.dtype == np.float64 for a in tensors.values())
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D (in, out), q|k|v side by side
    assert "lm_head.weight" not in tensors  # tied, as save_pretrained writes it
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["dtype"] == "float64" and cfg["n_embd"] == 16 and cfg["n_positions"] == 12 and cfg["n_inner"] is None
    loaded = hf.load_gpt2(folder, dtype=None)
    assert loaded.wte.weight.dtype == np.float64 and loaded.config == CFG
    assert all(p.requires_grad for p in loaded.parameters())
    assert _same(loaded, _state(model))
    assert hf.load_gpt2(folder).wte.weight.dtype == np.float32  # the default dtype


def test_keys_without_transformer_prefix_sharded_index_and_bfloat16_load(gpt2_dir, tmp_path):
    folder, model = gpt2_dir
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    expected = _state(hf.load_gpt2(folder, dtype="float64"))
    # the hub's gpt2 stores "h.0..." without "transformer." and the causal-mask buffers "h.N.attn.bias"
    bare = tmp_path / "bare"
    os.makedirs(bare)
    plain = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    plain["h.0.attn.bias"] = np.tril(np.ones((1, 1, 12, 12), dtype=np.float32))
    save_file(plain, str(bare / "model.safetensors"))
    _copy_config(folder, bare)
    assert _same(hf.load_gpt2(bare, dtype="float64"), expected)
    # two shards and a model.safetensors.index.json
    sharded = tmp_path / "sharded"
    os.makedirs(sharded)
    names = sorted(tensors)
    weight_map = {}
    for n, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(sharded / shard))
        weight_map.update({k: shard for k in part})
    with open(sharded / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    _copy_config(folder, sharded)
    assert _same(hf.load_gpt2(sharded, dtype="float64"), expected)
    # bfloat16 (NumPy has none): the top 16 bits of a float32, read exactly
    b16 = tmp_path / "bf16"
    os.makedirs(b16)
    as32 = {k: v.astype(np.float32) for k, v in tensors.items()}
    truncated = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in as32.items()}
    header = {k: {"dtype": "BF16", "shape": list(v.shape)} for k, v in as32.items()}
    _write_bf16(b16 / "model.safetensors", as32, header)
    _copy_config(folder, b16)
    got = hf.load_gpt2(b16, dtype=None)
    assert got.wte.weight.dtype == np.float32
    assert np.array_equal(got.state_dict()["blocks.1.attn.q.weight"], truncated["transformer.h.1.attn.c_attn.weight"][:, :16].T)


def _copy_config(src, dst):
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


def _write_bf16(path, arrays, header):
    offset, blobs = 0, []
    for k, v in arrays.items():
        raw = (v.view(np.uint32) >> 16).astype("<u2").tobytes()
        header[k]["data_offsets"] = [offset, offset + len(raw)]
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


@pytest.mark.parametrize("field, value, fragment", [
    ("activation_function", "relu", "gelu_new"),
    ("n_inner", 40, "4·n_embd"),
    ("scale_attn_by_inverse_layer_idx", True, "1/√head_dim"),
    ("reorder_and_upcast_attn", True, "upcast"),
    ("tie_word_embeddings", False, "untied"),
    ("model_type", "llama", "GPT-2"),
    ("scale_attn_weights", False, "1/√head_dim"),
    ("n_head", 3, "divisible"),
])
def test_a_config_field_minilora_cannot_represent_raises_naming_it(gpt2_dir, field, value, fragment):
    folder, _ = gpt2_dir
    _edit_config(folder, **{field: value})
    with pytest.raises(HFFormatError, match=field) as info:
        hf.load_gpt2(folder)
    assert fragment in str(info.value)


def test_layer_norm_epsilon_is_carried_over(gpt2_dir):
    folder, _ = gpt2_dir
    _edit_config(folder, layer_norm_epsilon=1e-6)
    model = hf.load_gpt2(folder)
    assert model.config.layer_norm_eps == 1e-6 and model.blocks[0].ln1.eps == 1e-6


def test_untied_head_tensor_wrong_shape_and_extra_tensor_raise(gpt2_dir):
    folder, _ = gpt2_dir
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    for change, fragment in (({"lm_head.weight": tensors["transformer.wte.weight"] + 1.0}, "untied"),
                             ({"transformer.h.0.mlp.c_fc.weight": np.zeros((64, 16))}, "(64, 16)"),
                             ({"transformer.h.2.ln_1.weight": np.ones(16)}, "unexpected ['h.2.ln_1.weight']")):
        save_file({**tensors, **change}, path)
        with pytest.raises(HFFormatError, match=r"model\.safetensors|gpt2") as info:
            hf.load_gpt2(folder)
        assert fragment in str(info.value)


def test_pickle_only_folder_truncated_file_missing_config_and_missing_folder(gpt2_dir, tmp_path):
    folder, _ = gpt2_dir
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(HFFormatError, match="not a readable safetensors file"):
        hf.load_gpt2(folder)
    os.remove(path)
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04not really a pickle")
    with pytest.raises(HFFormatError, match="never unpickles") as info:
        hf.load_gpt2(folder)
    assert "save_pretrained" in str(info.value)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(HFFormatError, match="no config.json"):
        hf.load_gpt2(folder)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        hf.load_gpt2(tmp_path / "nowhere", cache_dir=str(tmp_path / "empty-cache"))


def test_a_hub_name_resolves_through_the_local_cache_only(gpt2_dir, tmp_path):
    pytest.importorskip("huggingface_hub", reason="hub names need huggingface_hub")
    folder, model = gpt2_dir
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-gpt2" / "snapshots" / ("ab" * 20)
    os.makedirs(snapshot)
    os.makedirs(cache / "models--someone--tiny-gpt2" / "refs")
    (cache / "models--someone--tiny-gpt2" / "refs" / "main").write_text("ab" * 20)
    for name in ("config.json", "model.safetensors"):
        with open(os.path.join(folder, name), "rb") as f:
            (snapshot / name).write_bytes(f.read())
    assert _same(hf.load_gpt2("someone/tiny-gpt2", dtype="float64", cache_dir=str(cache)), _state(model))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        hf.load_gpt2("someone/not-cached", cache_dir=str(cache))


# ----------------------------------------------------------------------------- PEFT adapters, NumPy only
def _adapted(targets=("q", "v"), r=2, alpha=4.0, seed=3, **kw):
    model = _model()
    lora.apply_lora(model, lora.LoRAConfig(r=r, alpha=alpha, target_modules=targets, **kw))
    rng = np.random.default_rng(seed)
    for _, layer in lora.lora_layers(model):
        layer.lora_B["default"].data[...] = 0.3 * rng.standard_normal(layer.lora_B["default"].shape)
    return model


def test_export_layout_stacked_A_block_B_and_alpha(tmp_path):
    model = _adapted(("q", "v", "o"), r=2, alpha=8.0)
    hf.save_peft_adapter(tmp_path, model)
    with open(tmp_path / "adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["target_modules"] == ["attn.c_attn", "attn.c_proj"] and cfg["fan_in_fan_out"] is True
    assert (cfg["r"], cfg["lora_alpha"]) == (2, 8.0)  # o: PEFT's 8/2 = minilora's 8/2
    assert cfg["rank_pattern"] == {r"transformer\.h\.0\.attn\.c_attn": 4, r"transformer\.h\.1\.attn\.c_attn": 4}
    assert cfg["alpha_pattern"] == {r"transformer\.h\.0\.attn\.c_attn": 16.0, r"transformer\.h\.1\.attn\.c_attn": 16.0}
    t = load_file(tmp_path / "adapter_model.safetensors")
    a = t["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"]
    b = t["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    layers = dict(lora.lora_layers(model))
    q, v = layers["blocks.1.attn.q"], layers["blocks.1.attn.v"]
    assert np.array_equal(a, np.concatenate([q.lora_A["default"].data, v.lora_A["default"].data]))
    assert b.shape == (48, 4) and not b[16:32].any() and not b[:16, 2:].any() and not b[32:, :2].any()
    assert np.array_equal(b[:16, :2], q.lora_B["default"].data) and np.array_equal(b[32:, 2:], v.lora_B["default"].data)


@pytest.mark.parametrize("kw", [dict(targets=("q", "v")), dict(targets=("q", "k", "v", "o"), r=3),
                                dict(targets=("fc", "proj")), dict(targets=("q", "v", "fc"), r=4, use_rslora=True),
                                dict(targets=("blocks.1.attn.k",), bias="lora_only")])
def test_export_then_import_gives_the_same_adapter_and_logits(tmp_path, kw):
    model = _adapted(**kw)
    hf.save_peft_adapter(tmp_path, model)
    fresh = _model()
    assert hf.load_peft_adapter(tmp_path, fresh, "back") == "back"
    assert np.max(np.abs(_logits(fresh) - _logits(model))) <= 1e-12
    original, back = lora.get_adapter_config(model, "default"), lora.get_adapter_config(fresh, "back")
    assert (back.r, back.alpha, back.use_rslora, back.bias) == (original.r, original.alpha, original.use_rslora, original.bias)
    assert sorted(p for p, layer in lora.lora_layers(fresh) if "back" in layer.lora_A) == \
        sorted(p for p, _ in lora.lora_layers(model))
    assert lora.lora_layers(fresh)[0][1].active_adapters == ["back"]


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_deltas_export_as_trained_biases_and_import_as_deltas(tmp_path, bias):
    """PEFT trains b itself: the file holds b + Δb; loading it back gives Δb to the adapter, b untouched."""
    model = _adapted(("q", "v", "fc"), bias=bias)
    base = _model()
    params = dict(model.named_parameters())
    rng = np.random.default_rng(5)
    names = lora.bias_delta_names(model, "default")
    assert len(names) == (8 * CFG.n_layer + 1 if bias == "all" else 3 * CFG.n_layer)  # 6 Linear + 2 LN a block, ln_f
    for n in names:
        params[n].data[...] = 0.3 * rng.standard_normal(params[n].shape)
    hf.save_peft_adapter(tmp_path, model)
    t = load_file(tmp_path / "adapter_model.safetensors")
    pre = "base_model.model.transformer."
    d = CFG.d_model
    c_attn = t[pre + "h.1.attn.c_attn.base_layer.bias"]
    for n, p in enumerate("qkv"):
        b = params[f"blocks.1.attn.{p}.bias"].data
        delta = params[f"blocks.1.attn.{p}.lora_bias.default"].data if p != "k" or bias == "all" else 0.0
        assert np.array_equal(c_attn[n * d:(n + 1) * d], b + delta), p
    assert np.array_equal(t[pre + "h.0.mlp.c_fc.base_layer.bias"],
                          params["blocks.0.mlp.fc.bias"].data + params["blocks.0.mlp.fc.lora_bias.default"].data)
    if bias == "all":
        assert np.array_equal(t[pre + "ln_f.bias"], params["ln_f.bias"].data + params["ln_f.lora_bias.default"].data)
        assert np.array_equal(t[pre + "h.1.ln_2.bias"],
                              params["blocks.1.ln2.bias"].data + params["blocks.1.ln2.lora_bias.default"].data)
    else:
        assert pre + "ln_f.bias" not in t and pre + "h.0.attn.c_proj.bias" not in t
    fresh = _model()
    before = _state(fresh)
    hf.load_peft_adapter(tmp_path, fresh, "back")
    assert np.max(np.abs(_logits(fresh) - _logits(model))) <= 1e-12
    back = dict(fresh.named_parameters())
    for n in names:  # Δb comes back as the adapter's own; the base biases are the model's as before
        assert np.max(np.abs(back[n.replace(".default", ".back")].data - params[n].data)) <= 1e-15, n
        host = n.split(".lora_bias.")[0] + ".bias"
        assert np.array_equal(back[host].data, before[host]), host
    with lora.disable_adapters(fresh):
        assert np.array_equal(_logits(fresh), _logits(base))


def test_an_untrained_q_v_adapter_comes_back_as_q_v_through_the_recorded_c_attn_layout(tmp_path):
    """B = 0 says nothing about which of q, k, v a c_attn column feeds: the export records it in the metadata."""
    from minilora.hf.commands import adapter_updates

    model = _model()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4.0, target_modules=("q", "v", "o")))  # B = 0: untrained
    hf.save_peft_adapter(tmp_path / "a", model)
    fresh = _model()
    hf.load_peft_adapter(tmp_path / "a", fresh)
    assert sorted(p for p, _ in lora.lora_layers(fresh)) == sorted(p for p, _ in lora.lora_layers(model))
    assert lora.get_adapter_config(fresh, "default").r == 2
    layers = dict(lora.lora_layers(model))
    for p, layer in lora.lora_layers(fresh):
        assert np.array_equal(layer.lora_A["default"].data, layers[p].lora_A["default"].data), p
    assert sorted(adapter_updates(tmp_path / "a")[0]) == sorted(layers)
    # a layout that B contradicts (the k block trained further elsewhere) is not trusted: the layout of B wins
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    with open(tmp_path / "a" / "adapter_model.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        metadata = json.loads(f.read(n))["__metadata__"]
    t = load_file(tmp_path / "a" / "adapter_model.safetensors")
    t[key][16:32, :] = 0.1
    save_file(t, tmp_path / "a" / "adapter_model.safetensors", metadata=metadata)
    again = _model()
    hf.load_peft_adapter(tmp_path / "a", again)
    assert "blocks.0.attn.k" in dict(lora.lora_layers(again))
    assert np.max(np.abs(_logits(again) - _logits(fresh))) > 1e-6


def test_mixed_ranks_and_scalings_export_and_import_with_equal_logits(tmp_path):
    model = _adapted(("q", "v"), r=2, alpha=4.0)
    layers = dict(lora.lora_layers(model))
    layers["blocks.0.attn.v"].delete_adapter("default")
    layers["blocks.0.attn.v"].add_adapter("default", lora.LoRAConfig(r=4, alpha=3.0, target_modules=("v",)))
    layers["blocks.0.attn.v"].lora_B["default"].data[...] = 0.2
    hf.save_peft_adapter(tmp_path, model)
    with open(tmp_path / "adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["rank_pattern"] == {r"transformer\.h\.0\.attn\.c_attn": 6}
    fresh = _model()
    hf.load_peft_adapter(tmp_path, fresh)
    assert lora.get_adapter_config(fresh, "default").r == 4  # one config: the smaller ranks padded with zeros
    assert np.max(np.abs(_logits(fresh) - _logits(model))) <= 1e-12


@given(ranks=st.lists(st.lists(st.integers(0, 3), min_size=6, max_size=6), min_size=2, max_size=2),
       alphas=st.lists(st.sampled_from([1.0, 2.0, 3.0, 8.0]), min_size=12, max_size=12),
       rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_any_per_layer_ranks_and_scalings_survive_export_and_import(ranks, alphas, rslora, seed):
    """Property: whatever rank and alpha each of q, k, v, o, fc, proj has in each block (0 = not adapted),
    save_peft_adapter -> load_peft_adapter reproduces every ΔW = s·B·A (and so the logits)."""
    if not any(any(block) for block in ranks):
        ranks[0][0] = 1
    model = _model(seed=seed % 7)
    rng = np.random.default_rng(seed)
    parts = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.proj")
    first = True
    for i, block in enumerate(ranks):
        for n, (part, r) in enumerate(zip(parts, block)):
            if not r:
                continue
            path = f"blocks.{i}.{part}"
            cfg = lora.LoRAConfig(r=r, alpha=alphas[6 * i + n], use_rslora=rslora, target_modules=(path,))
            if first:
                lora.apply_lora(model, cfg)
                first = False
            else:  # one adapter, another LoRAConfig in this layer: wrap it under a scratch name, then add it
                lora.apply_lora(model, cfg, adapter_name="scratch", activate=False)
                layer = dict(lora.lora_layers(model))[path]
                layer.add_adapter("default", cfg, activate=False)
                lora.delete_adapter(model, "scratch")
            layer = dict(lora.lora_layers(model))[path]
            layer.lora_B["default"].data[...] = rng.standard_normal(layer.lora_B["default"].shape)
    lora.set_adapter(model, "default")
    with tempfile.TemporaryDirectory() as folder:
        hf.save_peft_adapter(folder, model)
        fresh = _model(seed=seed % 7)
        hf.load_peft_adapter(folder, fresh, "back")
    def deltas(m, name):  # ΔW = s·B·A of every layer the adapter adapts
        return {p: layer.lora_config[name].scaling * (np.asarray(layer.lora_B[name].data) @ np.asarray(layer.lora_A[name].data))
                for p, layer in lora.lora_layers(m) if name in layer.lora_A}

    ours, back = deltas(model, "default"), deltas(fresh, "back")
    assert set(back) == set(ours)
    for p, delta in ours.items():
        assert np.max(np.abs(back[p] - delta)) <= 1e-12 * max(1.0, np.max(np.abs(delta))), p
    assert np.max(np.abs(_logits(fresh) - _logits(model))) <= 1e-11


def test_save_gpt2_of_a_lora_model_writes_the_base_weights_only(tmp_path):
    model = _adapted(("q", "v"))
    hf.save_gpt2(tmp_path, model)
    assert not any("lora" in k for k in load_file(tmp_path / "model.safetensors"))
    assert _same(hf.load_gpt2(tmp_path, dtype="float64"), {n: a for n, a in _state(model).items() if ".lora_" not in n})


def _broken(tmp_path, how):
    folder = tmp_path / "adapter"
    hf.save_peft_adapter(folder, _adapted(("q", "v", "o")))
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    t = load_file(weights)
    with open(config) as f:
        cfg = json.load(f)
    key_a = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    key_b = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    if how == "dora without magnitudes":
        cfg["use_dora"] = True
    elif how == "other peft type":
        cfg["peft_type"] = "IA3"
    elif how == "modules_to_save":
        cfg["modules_to_save"] = ["lm_head"]
    elif how == "unknown target":
        t["base_model.model.lm_head.lora_A.weight"] = np.zeros((2, 16))
    elif how == "wrong shapes":
        t[key_a] = np.zeros((4, 24))
    elif how == "rank differs from config":
        t[key_a], t[key_b] = t[key_a][:3], t[key_b][:, :3]
    elif how == "missing lora_B":
        del t[key_b]
    elif how == "nan":
        t[key_b][0, 0] = np.nan
    elif how == "olora init":
        cfg["init_lora_weights"] = "olora"
    elif how == "alpha 1e38":
        cfg["lora_alpha"] = 1e38
    elif how == "dropout 0.95":
        cfg["lora_dropout"] = 0.95
    elif how == "untargeted tensors":
        cfg["target_modules"] = ["attn.c_proj"]  # the file still holds c_attn's A and B
    elif how == "other layers":
        cfg["layers_to_transform"] = [1]  # the file still holds block 0's A and B
    elif how == "no prefix":
        t = {k.removeprefix("base_model.model."): v for k, v in t.items()}
    elif how == "block out of range":
        t = {k.replace("h.1.", "h.7."): v for k, v in t.items()}
        cfg["target_modules"] = ["attn.c_attn", "attn.c_proj"]
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 100])
    elif how == "bin only":
        os.remove(weights)
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04")
    else:
        save_file(t, str(weights))
    with open(config, "w") as f:
        json.dump(cfg, f)
    return folder


@pytest.mark.parametrize("how, fragment", [
    ("dora without magnitudes", "no lora_magnitude_vector"), ("other peft type", "IA3"), ("modules_to_save", "modules_to_save"),
    ("unknown target", "lm_head"), ("wrong shapes", "another model size"), ("rank differs from config", "rank 3"),
    ("missing lora_B", "not both"), ("nan", "NaN"), ("block out of range", "h.7"),
    ("truncated", "not a readable safetensors file"), ("bin only", "never unpickles"),
    ("olora init", "path_initial_model_for_weight_conversion"), ("alpha 1e38", "outside (0, 10000]"),
    ("dropout 0.95", "lora_dropout = 0.95"), ("untargeted tensors", "does not target (target_modules ['attn.c_proj']"),
    ("other layers", "layers_to_transform [1]"), ("no prefix", "lacks the prefix 'base_model.model.transformer.'"),
])
def test_bad_peft_adapters_raise_clearly_and_leave_the_model_bit_identical(tmp_path, how, fragment):
    folder = _broken(tmp_path, how)
    model = _adapted(("q",), seed=9)  # a model that already holds an adapter of its own
    before, adapters = _state(model), lora.list_adapters(model)
    with pytest.raises(HFFormatError) as info:
        hf.load_peft_adapter(folder, model, "imported")
    assert fragment in str(info.value), str(info.value)
    assert _same(model, before) and lora.list_adapters(model) == adapters


def test_load_peft_adapter_refuses_a_taken_name_and_export_refuses_unknown_adapter(tmp_path):
    model = _adapted()
    hf.save_peft_adapter(tmp_path, model)
    with pytest.raises(ValueError, match="already has an adapter 'default'"):
        hf.load_peft_adapter(tmp_path, model)
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        hf.save_peft_adapter(tmp_path / "x", model, "nope")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        hf.load_peft_adapter(tmp_path / "x", _model())
    os.makedirs(tmp_path / "x")
    with pytest.raises(HFFormatError, match="no adapter_config.json"):
        hf.load_peft_adapter(tmp_path / "x", _model())


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_on_a_tokenizer_trained_offline(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="load_tokenizer needs the tokenizers package (extra hf)")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The Eagle is a French restaurant near the river.", "Cheap food, friendly staff; 5 stars!",
              "Café Déjà Vu serves crème brûlée — naïvely good."] * 20
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    assert isinstance(trainer, trainers.BpeTrainer)
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    loaded = hf.load_tokenizer(tmp_path)
    assert loaded.eos_id == tok.token_to_id("<|endoftext|>") and loaded.vocab_size == tok.get_vocab_size()
    for text in corpus[:3] + ["unseen words: Zürich 東京 🙂", "  leading and trailing spaces  "]:
        ids = loaded.encode(text)
        assert all(isinstance(i, int) and 0 <= i < loaded.vocab_size for i in ids)
        assert loaded.decode(ids) == text  # byte-level BPE loses nothing
    assert loaded.decode(loaded.encode("food") + [loaded.eos_id], skip_special=True) == "food"
    # GPT-2's older layout: vocab.json + merges.txt only
    legacy = tmp_path / "legacy"
    os.makedirs(legacy)
    tok.model.save(str(legacy))
    assert hf.load_tokenizer(legacy).encode(corpus[1]) == loaded.encode(corpus[1])
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(HFFormatError, match="cannot be read"):
        hf.load_tokenizer(tmp_path)
    with pytest.raises(HFFormatError, match="no tokenizer.json"):
        hf.load_tokenizer(tmp_path / "legacy-empty" if os.makedirs(tmp_path / "legacy-empty") is None else None)


# ----------------------------------------------------------------------------- analysis and the CLI
def test_low_rank_svd_is_the_svd_of_the_update_without_forming_it():
    from minilora.analysis import low_rank_svd

    rng = np.random.default_rng(0)
    for d, k, r in ((7, 5, 3), (16, 48, 4), (5, 9, 5)):
        B, A = rng.standard_normal((d, r)), rng.standard_normal((r, k))
        U, S, Vh = low_rank_svd(B, A, 2.5)
        assert U.shape == (d, r) and S.shape == (r,) and Vh.shape == (r, k)
        assert np.allclose((U * S) @ Vh, 2.5 * B @ A, atol=1e-12)
        assert np.allclose(S, np.linalg.svd(2.5 * B @ A, compute_uv=False)[:r], atol=1e-12)
        assert np.allclose(U.T @ U, np.eye(r), atol=1e-12) and np.all(np.diff(S) <= 1e-12)
    with pytest.raises(ValueError, match="disagree on the rank"):
        low_rank_svd(np.ones((4, 2)), np.ones((3, 4)))


def test_cli_export_import_peft_and_analyze_on_the_shipped_base(tmp_path, capsys):
    from minilora.cli import main
    from minilora.models import load_base

    base = load_base()
    lora.apply_lora(base, lora.LoRAConfig(r=2, alpha=4.0, target_modules=("q", "v")), adapter_name="e2e")
    rng = np.random.default_rng(0)
    for _, layer in lora.lora_layers(base):
        layer.lora_B["e2e"].data[...] = 0.1 * rng.standard_normal(layer.lora_B["e2e"].shape)
    lora.save_adapter(tmp_path / "e2e.safetensors", base, "e2e")
    assert main(["export", "--adapter", str(tmp_path / "e2e.safetensors"), "--to-peft", str(tmp_path / "peft"),
                 "--base-to-hf", str(tmp_path / "base-hf")]) == 0
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str(tmp_path / "base-hf")
    assert main(["import-peft", str(tmp_path / "peft"), "--out", str(tmp_path / "back.safetensors")]) == 0
    again = load_base()
    lora.load_adapter(tmp_path / "back.safetensors", again)
    assert np.max(np.abs(_logits(again) - _logits(base))) <= 1e-5
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "peft"), "--against", str(tmp_path / "e2e.safetensors"),
                 "--out", str(tmp_path / "an")]) == 0
    out = capsys.readouterr().out
    assert "blocks.3.attn.v" in out and "amplif." in out and "φ(1,1)" in out
    with open(tmp_path / "an" / "analyze.json") as f:
        rows = json.load(f)["rows"]
    assert len(rows) == 8 and all(r["r"] == 2 and abs(r["phi_r_r"] - 1.0) < 1e-9 for r in rows)
    assert all(np.isfinite(r["amplification"]) and r["amplification"] > 0 for r in rows)
    if os.path.exists(tmp_path / "an" / "analyze.png"):
        assert (tmp_path / "an" / "analyze.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["export", "--adapter", str(tmp_path / "e2e.safetensors")]) == 2  # nothing to write: an error
    assert main(["export", "--adapter", str(tmp_path / "e2e.safetensors"), "--float64", "--to-peft",
                 str(tmp_path / "peft64"), "--base-to-hf", str(tmp_path / "base64")]) == 0
    assert load_file(tmp_path / "base64" / "model.safetensors")["transformer.wte.weight"].dtype == np.float64
    in64 = hf.load_gpt2(tmp_path / "base64", dtype=None)
    hf.load_peft_adapter(tmp_path / "peft64", in64)
    assert np.max(np.abs(_logits(in64) - _logits(base))) <= 1e-5


@pytest.mark.parametrize("variant", ["pissa", "dora", "pissa+dora"])
def test_cli_analyze_reports_the_real_weight_change_of_pissa_and_dora(tmp_path, capsys, monkeypatch, variant):
    """PiSSA trains on W_res and DoRA renormalises rows: ΔW = W − W0 of the merged weight, not s·B·A."""
    from minilora.cli import main
    from minilora.hf import commands
    from minilora.models import load_base

    kw = dict(init="pissa" if "pissa" in variant else "kaiming", use_dora="dora" in variant)
    model = load_base(dtype="float64")
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4.0, target_modules=("q", "v"), **kw))
    untrained = tmp_path / "untrained.safetensors"
    lora.save_adapter(untrained, model)
    rng = np.random.default_rng(1)
    for _, layer in lora.lora_layers(model):
        layer.lora_B["default"].data[...] += 0.05 * rng.standard_normal(layer.lora_B["default"].shape)
        if "dora" in variant:
            layer.lora_magnitude["default"].data[...] *= 1.0 + 0.1 * rng.random(layer.lora_magnitude["default"].shape)
    trained = tmp_path / "trained.safetensors"
    lora.save_adapter(trained, model)
    runs = [("untrained", [str(untrained)]), ("trained", [str(trained)])]
    if variant == "dora":  # the same DoRA adapter as a PEFT folder (c_attn's magnitude split by rows)
        hf.save_peft_adapter(tmp_path / "peft", model)
        hf.save_gpt2(tmp_path / "base", load_base(dtype="float64"))
        runs.append(("peft", [str(tmp_path / "peft"), "--base", str(tmp_path / "base")]))
    W0 = {n: np.array(p.data) for n, p in load_base(dtype="float64").named_parameters()}
    lora.merge(model)
    expected = {p: np.linalg.norm(layer.weight.data - W0[p + ".weight"]) for p, layer in lora.lora_layers(model)}
    saved = []
    monkeypatch.setattr(commands, "save_json", lambda path, obj: saved.append(path) or ml.io.save_json(path, obj))
    for name, argv in runs:
        assert main(["analyze", *argv, "--out", str(tmp_path / name)]) == 0
        with open(tmp_path / name / "analyze.json") as f:
            rows = json.load(f)["rows"]
        assert len(rows) == 8 and all(("PiSSA" in r["update"]) == ("pissa" in variant) for r in rows)
        for row in rows:
            norm = row["norm_delta_W"]
            if name == "untrained" and "pissa" in variant:  # the model equals the base: ΔW = 0 (s·B·A alone is large)
                assert norm <= 1e-5 and np.linalg.norm(row["singular_values"]) <= 1e-5, row["matrix"]
            elif name == "untrained":  # DoRA at init: B = 0 and m = ‖W0‖_row, so W = W0
                assert norm <= 1e-6, row["matrix"]
            else:
                assert abs(norm - expected[row["matrix"]]) <= 1e-5 * expected[row["matrix"]], row["matrix"]
            assert len(row["singular_values"]) == (2 if "dora" in variant else 4)
    assert saved == [os.path.join(str(tmp_path / n), "analyze.json") for n, _ in runs]  # atomic (io.save_json)


def test_cli_analyze_refuses_pissa_and_dora_without_the_base_weights(tmp_path):
    from minilora.hf.commands import _row

    A, B = np.ones((2, 16)), np.ones((16, 2))
    for info, what in ((dict(init="pissa"), "PiSSA"), (dict(init="kaiming", magnitudes={"blocks.0.attn.q": np.ones(16)}),
                                                       "DoRA")):
        with pytest.raises(ValueError, match=rf"blocks\.0\.attn\.q: a {what} adapter .*pass --base"):
            _row("blocks.0.attn.q", A, B, 2.0, {}, None, info)


def _gpt2_with_a_text(tmp_path) -> tuple[str, str]:
    """A tiny GPT-2 folder with a BPE tokenizer.json trained on a text, and that text in notes.txt."""
    tokenizers = pytest.importorskip("tokenizers", reason="finetune --text needs the tokenizers package (extra hf)")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    text = "the eagle is a french restaurant near the river. " * 30
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ml.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=16, n_layer=1, n_head=2, d_model=16))
    hf.save_gpt2(tmp_path / "gpt2", model)
    tok.save(str(tmp_path / "gpt2" / "tokenizer.json"))
    (tmp_path / "notes.txt").write_text(text)
    return str(tmp_path / "gpt2"), text


def test_cli_finetune_on_a_text_file_with_an_imported_gpt2(tmp_path, capsys):
    from minilora.cli import main

    folder, _ = _gpt2_with_a_text(tmp_path)
    assert main(["finetune", "--base", folder, "--text", str(tmp_path / "notes.txt"), "--r", "2",
                 "--steps", "3", "--batch-size", "2", "--block-size", "8", "--lr", "1e-2", "--no-progress",
                 "--out", str(tmp_path / "out")]) == 0
    assert "held-out LM loss" in capsys.readouterr().out
    adapted = hf.load_gpt2(folder)
    assert lora.load_adapter(tmp_path / "out" / "text.safetensors", adapted) == "text"
    layer = dict(lora.lora_layers(adapted))["blocks.0.attn.q"]
    assert np.any(layer.lora_B["text"].data != 0)  # it trained
    assert main(["finetune", "--base", folder, "--no-progress"]) == 2  # --text missing


def test_cli_finetune_on_a_text_file_is_the_recipe_and_trains_with_the_task_schedule(tmp_path, capsys):
    """The CLI's adapter is recipes.finetune_text's, bit for bit, and that trains on fit_with_warmup's schedule."""
    from minilora import optim, recipes
    from minilora.cli import main

    folder, text = _gpt2_with_a_text(tmp_path)
    assert main(["finetune", "--base", folder, "--text", str(tmp_path / "notes.txt"), "--r", "2", "--alpha", "3",
                 "--steps", "10", "--batch-size", "2", "--block-size", "8", "--lr", "1e-2", "--seed", "3",
                 "--no-progress", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    ids = hf.load_tokenizer(folder).encode(text)
    run = recipes.finetune_text(hf.load_gpt2(folder), ids, block_size=8, r=2, alpha=3.0, steps=10, batch_size=2,
                                lr=1e-2, seed=3, progress=False)
    from_cli = hf.load_gpt2(folder)
    lora.load_adapter(tmp_path / "out" / "text.safetensors", from_cli)
    direct = lora.lora_state_dict(run.model, "text")
    assert sorted(lora.lora_state_dict(from_cli, "text")) == sorted(direct)
    for key, value in lora.lora_state_dict(from_cli, "text").items():
        np.testing.assert_array_equal(value, direct[key], err_msg=key)
    assert f"held-out LM loss {run.loss_before:.4f} -> {run.loss_after:.4f}" in printed
    # a task fine-tune's schedule: warm-up over 10 % of the steps, linear decay (History.lrs: the rate after each step)
    assert run.history.lrs == pytest.approx(
        [1e-2 * optim.warmup_linear(step, total=10, warmup=1) for step in range(1, 11)], rel=1e-12, abs=0)


@pytest.mark.slow
def test_tutorial_08_skips_the_peft_part_cleanly_without_torch_transformers_and_peft(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hide = ("import sys, runpy; sys.modules.update({m: None for m in ('torch', 'transformers', 'peft')}); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {**os.environ, "MINILORA_FAST": "1", "MPLBACKEND": "Agg", "MINILORA_OUT": str(tmp_path),
           "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": repo}
    proc = subprocess.run([sys.executable, "-c", hide, os.path.join(repo, "tutorials", "08_to_peft.py")], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PEFT check off" in proc.stdout and "skipped: torch, transformers or peft is not installed" in proc.stdout
    assert "round trip minilora -> PEFT -> minilora: max |Δ logits| = 0.0e+00" in proc.stdout
    assert (tmp_path / "08_peft_analysis.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- tutorial 08's exercises
def test_tutorial_08_exercises_solutions_pass_wrong_answers_are_diagnosed_and_no_solution_is_in_the_tutorial(capsys):
    from minilora import exercises as ex
    from minilora.exercises import interop as ex08  # 08.1 and 08.2 (registered with the harness)

    ids = {e.id: e for e in ex.exercises()}
    for id_, check in (("08.1", ex08.check_pack_c_attn), ("08.2", ex08.check_block_B)):
        assert check(ex.solution(id_)) is True and "✓" in capsys.readouterr().out
        assert ids[id_].hints[0] != ids[id_].hints[1]
    assert ex08.check_pack_c_attn(lambda W_q, W_k, W_v: (_ for _ in ()).throw(NotImplementedError)) is None
    assert "not attempted yet" in capsys.readouterr().out
    wrong = {
        ex08.check_pack_c_attn: [(lambda W_q, W_k, W_v: np.concatenate([W_q, W_k, W_v], axis=1), "Conv1D wants (in, out)"),
                                 (lambda W_q, W_k, W_v: np.concatenate([W_q.T, W_k.T, W_v.T], axis=0), "shape"),
                                 (lambda W_q, W_k, W_v: np.concatenate([W_k.T, W_q.T, W_v.T], axis=1), "differ")],
        ex08.check_block_B: [(lambda B_q, B_v: np.zeros((3 * len(B_q), 4)), "all zeros"),
                             (lambda B_q, B_v: np.block([[B_q, B_q], [B_v, B_v], [B_v, B_v]]), "k outputs"),
                             (lambda B_q, B_v: np.block([[np.zeros_like(B_q), B_v], [np.zeros((6, 4))],
                                                         [B_q, np.zeros_like(B_q)]]), "swapped")],
    }
    for check, answers in wrong.items():
        for answer, fragment in answers:
            with pytest.raises(ex.ExerciseError) as info:
                check(answer)
            assert fragment in str(info.value) and "Hint" in str(info.value), str(info.value)
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tutorials", "08_to_peft.py"),
              encoding="utf-8") as f:
        text = f.read()
    assert len(re.findall(r"\*\*Exercise \d", text)) == 2
    assert "def solution" not in text
    for id_ in ("08.1", "08.2"):
        for line in ids[id_].solution.splitlines():
            if line.strip().startswith("return "):
                assert line.strip() not in text, f"tutorial 08 prints the answer of {id_}"


def test_dora_adapters_export_and_import_with_their_magnitudes(tmp_path):
    model = _adapted(("q", "v", "fc"), r=2, use_dora=True)
    rng = np.random.default_rng(5)
    for _, layer in lora.lora_layers(model):
        layer.lora_magnitude["default"].data[...] *= 1.0 + 0.2 * rng.random(layer.lora_magnitude["default"].shape)
    hf.save_peft_adapter(tmp_path / "dora", model)
    with open(tmp_path / "dora" / "adapter_config.json") as f:
        assert json.load(f)["use_dora"] is True
    t = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    m = t["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"]
    k_weight = dict(model.named_parameters())["blocks.0.attn.k.weight"].data
    assert m.shape == (48,) and np.allclose(m[16:32], np.linalg.norm(k_weight, axis=1), rtol=1e-15)  # k: m / ‖W0‖ = 1
    fresh = _model()
    hf.load_peft_adapter(tmp_path / "dora", fresh, "back")
    cfg = lora.get_adapter_config(fresh, "back")
    assert cfg.use_dora and cfg.dora_detach_norm  # PEFT detaches the norm in the backward
    assert sorted(p for p, layer in lora.lora_layers(fresh) if "back" in layer.lora_A) == \
        sorted(p for p, _ in lora.lora_layers(model))  # k stays unadapted: its magnitude is W0's own norm
    assert np.max(np.abs(_logits(fresh) - _logits(model))) <= 1e-12
    # a trained magnitude on k (a zero block of B) is kept: k becomes a DoRA layer with a zero update
    t["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"][20] *= 1.5
    save_file(t, str(tmp_path / "dora" / "adapter_model.safetensors"))
    again = _model()
    hf.load_peft_adapter(tmp_path / "dora", again)
    assert "blocks.0.attn.k" in dict(lora.lora_layers(again))
    out_k = np.asarray(dict(lora.lora_layers(again))["blocks.0.attn.k"].lora_magnitude["default"].data)
    assert out_k[4] == t["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"][20]
    mixed = _adapted(("q",), r=2)
    lora.apply_lora(mixed, lora.LoRAConfig(r=2, alpha=4.0, use_dora=True, target_modules=("v",)), adapter_name="d")
    layers = dict(lora.lora_layers(mixed))
    layers["blocks.0.attn.q"].add_adapter("d", lora.LoRAConfig(r=2, alpha=4.0, target_modules=("q",)))
    with pytest.raises(ValueError, match="DoRA in some layers"):
        hf.save_peft_adapter(tmp_path / "mixed", mixed, "d")
