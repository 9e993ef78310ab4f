"""minilora.hf against stock transformers (GPT2LMHeadModel) and stock PEFT, in float64.

- tiny random GPT-2s (every parameter perturbed, so biases and LayerNorms are not trivial), saved
  with ``save_pretrained`` -> ``hf.load_gpt2``: logits, the masked loss (computed here in float64,
  not with HF's ``labels=``, which upcasts to float32) and every parameter gradient agree to 1e-10;
- ``hf.save_gpt2`` -> ``GPT2LMHeadModel.from_pretrained``: equal logits, the model's dtype kept;
- minilora LoRA (q,v / q,k,v,o / fc,proj / rsLoRA / mixed ranks) -> ``hf.save_peft_adapter`` ->
  ``PeftModel.from_pretrained``: equal logits, and equal after PEFT's ``merge_and_unload`` vs ``lora.merge``;
- a PEFT adapter from ``get_peft_model`` with random A, B -> ``hf.load_peft_adapter``: equal logits;
- transformers' own sharded and bfloat16 checkpoints load; ``hf.load_tokenizer`` encodes as ``GPT2Tokenizer``.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the Hugging Face oracle needs torch")
transformers = pytest.importorskip("transformers", reason="the Hugging Face oracle needs transformers")

import minilora as ml  # noqa: E402
from minilora import hf, lora  # noqa: E402

TOL = 1e-10
CONFIGS = {
    "d32-L2-H4": dict(vocab_size=61, n_positions=24, n_embd=32, n_layer=2, n_head=4),
    "d24-L3-H2-eps1e-6": dict(vocab_size=37, n_positions=16, n_embd=24, n_layer=3, n_head=2, layer_norm_epsilon=1e-6),
}


def _hf_model(cfg: dict, seed: int):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**cfg, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # weights, biases and LayerNorm gains all move away from their init
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def gpt2_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    _hf_model(CONFIGS[request.param], seed=len(request.param)).save_pretrained(folder)
    return folder, CONFIGS[request.param]


def _from_pretrained(folder):
    return transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float64).eval()


def _batch(cfg, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    T = cfg["n_positions"]
    idx = rng.integers(0, cfg["vocab_size"], (batch, T))
    targets = rng.integers(0, cfg["vocab_size"], (batch, T))
    mask = (rng.random((batch, T)) < 0.6).astype(np.float64)
    mask[0, -1] = 1.0
    return idx, targets, mask


def _logits_hf(model, idx):
    with torch.no_grad():
        return model(torch.tensor(idx)).logits.double().numpy()


def _logits_ml(model, idx):
    model.eval()
    with ml.no_grad():
        return np.asarray(ml.backend.to_numpy(model(idx).data))


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))))


# ----------------------------------------------------------------------------- the base model
def test_logits_loss_and_every_gradient_equal_hf(gpt2_dir):
    folder, cfg = gpt2_dir
    ref = _from_pretrained(folder)
    model = hf.load_gpt2(folder, dtype="float64")
    assert all(p.requires_grad for p in model.parameters()) and model.wte.weight.dtype == np.float64
    idx, targets, mask = _batch(cfg)

    logits = ref(torch.tensor(idx)).logits
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(targets)[..., None])[..., 0]
    loss_ref = (nll * torch.tensor(mask)).sum() / mask.sum()  # the masked mean of eq. 2, in float64
    loss_ref.backward()
    loss = model.loss(idx, targets, mask)
    loss.backward()

    assert _rel(_logits_ml(model, idx), logits.detach().numpy()) <= TOL
    assert abs(float(loss.item()) - float(loss_ref)) <= TOL * abs(float(loss_ref))
    grads_hf = {n: p.grad.numpy() for n, p in ref.named_parameters()}  # the tied head appears once, as wte
    expected = hf.checkpoint.from_hf_state(grads_hf, model.config, "grads")
    largest = max(float(np.max(np.abs(g))) for g in expected.values())
    params = dict(model.named_parameters())
    assert set(params) == set(expected)
    for name, g in expected.items():
        got = params[name].grad
        if name.endswith("attn.k.bias"):
            # softmax ignores a shift that is the same for every key of a row: the gradient is 0 in exact
            # arithmetic, so both sides are rounding noise; compare it with the largest gradient
            assert np.max(np.abs(got)) <= TOL * largest and np.max(np.abs(g)) <= TOL * largest, name
        else:
            assert np.max(np.abs(got - g)) <= TOL * np.max(np.abs(g)), (name, np.max(np.abs(got - g)))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_save_gpt2_from_pretrained_equal_logits(gpt2_dir, tmp_path, dtype):
    folder, cfg = gpt2_dir
    model = hf.load_gpt2(folder, dtype=dtype)
    with ml.no_grad():  # make it differ from the file it came from
        for p in model.parameters():
            p.data[...] += (0.01 * np.random.default_rng(1).standard_normal(p.shape)).astype(dtype)
    hf.save_gpt2(tmp_path, model)
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()  # the dtype comes from config.json
    assert str(ref.dtype) == f"torch.{dtype}"
    idx, _, _ = _batch(cfg, seed=3)
    tol = TOL if dtype == "float64" else 1e-5
    assert _rel(_logits_ml(model, idx), _logits_hf(ref, idx)) <= tol


# ----------------------------------------------------------------------------- adapters out
def _randomise_adapter(model, name, seed):
    rng = np.random.default_rng(seed)
    for _, layer in lora.lora_layers(model):
        if name in layer.lora_A:
            for part in (layer.lora_A[name], layer.lora_B[name]):
                part.data[...] = 0.3 * rng.standard_normal(part.shape)
            if name in layer.lora_magnitude:  # DoRA: a trained magnitude, away from W0's row norms
                layer.lora_magnitude[name].data[...] *= 1.0 + 0.2 * rng.random(layer.lora_magnitude[name].shape)


def _with_mixed_ranks(model):
    """q and v at r = 2 everywhere, but block 0's v at r = 4 with another alpha, and block 1's q at r = 3."""
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4.0, target_modules=("q", "v", "fc")))
    layers = dict(lora.lora_layers(model))
    for path, cfg in (("blocks.0.attn.v", lora.LoRAConfig(r=4, alpha=3.0, target_modules=("v",))),
                      ("blocks.1.attn.q", lora.LoRAConfig(r=3, alpha=4.0, target_modules=("q",)))):
        layers[path].delete_adapter("default")
        layers[path].add_adapter("default", cfg)


EXPORT_CASES = {
    "q,v": lambda m: lora.apply_lora(m, lora.LoRAConfig(r=2, alpha=8.0, target_modules=("q", "v"))),
    "q,k,v,o": lambda m: lora.apply_lora(m, lora.LoRAConfig(r=3, alpha=6.0, target_modules=("q", "k", "v", "o"))),
    "fc,proj": lambda m: lora.apply_lora(m, lora.LoRAConfig(r=2, alpha=2.0, target_modules=("fc", "proj"))),
    "rslora q,v,o": lambda m: lora.apply_lora(m, lora.LoRAConfig(r=4, alpha=4.0, use_rslora=True,
                                                                 target_modules=("q", "v", "o"))),
    "mixed ranks": _with_mixed_ranks,
    "DoRA q,v": lambda m: lora.apply_lora(m, lora.LoRAConfig(r=2, alpha=4.0, use_dora=True, target_modules=("q", "v"))),
    "DoRA q,k,v,o,fc rsLoRA": lambda m: lora.apply_lora(m, lora.LoRAConfig(r=3, alpha=3.0, use_dora=True, use_rslora=True,
                                                                           target_modules=("q", "k", "v", "o", "fc"))),
    "one block, bias": lambda m: lora.apply_lora(m, lora.LoRAConfig(r=2, alpha=4.0, bias="lora_only",
                                                                    target_modules=("blocks.1.attn.q", "blocks.1.mlp.proj"))),
    "q,v,fc, bias=all": lambda m: lora.apply_lora(m, lora.LoRAConfig(r=2, alpha=4.0, bias="all",
                                                                     target_modules=("q", "v", "fc"))),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_save_peft_adapter_loads_in_peft_with_equal_logits_and_merge(gpt2_dir, tmp_path, case):
    peft = pytest.importorskip("peft", reason="the PEFT oracle needs peft")
    folder, cfg = gpt2_dir
    model = hf.load_gpt2(folder, dtype="float64")
    EXPORT_CASES[case](model)
    _randomise_adapter(model, "default", seed=7)
    params = dict(model.named_parameters())
    deltas = lora.bias_delta_names(model, "default")
    assert bool(deltas) == ("bias" in case)
    rng = np.random.default_rng(3)
    for name in deltas:  # a trained bias is the adapter's own Δb (the base b stays frozen) and travels with it
        params[name].data[...] = 0.3 * rng.standard_normal(params[name].shape)
    hf.save_peft_adapter(tmp_path / "adapter", model)
    peft_model = peft.PeftModel.from_pretrained(_from_pretrained(folder), tmp_path / "adapter").eval()
    idx, _, _ = _batch(cfg, seed=5)
    ours = _logits_ml(model, idx)
    assert _rel(ours, _logits_ml(hf.load_gpt2(folder, dtype="float64"), idx)) > 1e-3  # the adapter does something
    assert _rel(ours, _logits_hf(peft_model, idx)) <= TOL

    merged_hf = peft_model.merge_and_unload()
    lora.merge(model)
    assert _rel(_logits_ml(model, idx), _logits_hf(merged_hf, idx)) <= TOL
    expected = hf.checkpoint.from_hf_state({n: p.detach().numpy() for n, p in merged_hf.named_parameters()},
                                           model.config, "merged")
    params = dict(model.named_parameters())
    for name, w in expected.items():  # W0 + ΔW itself (and b + Δb), not only its effect on the logits
        delta = params.get(name.removesuffix(".bias") + ".lora_bias.default")
        ours = params[name].data + (0.0 if delta is None else delta.data)
        assert np.max(np.abs(ours - w)) <= TOL * max(1.0, np.max(np.abs(w))), name


# ----------------------------------------------------------------------------- adapters in
PEFT_CASES = {
    "c_attn r=4": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
    "all four, patterns, rsLoRA": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True,
                                       rank_pattern={"mlp.c_fc": 5, "h.0.attn.c_attn": 3},
                                       alpha_pattern={"attn.c_proj": 1.5}),
    "bias=all": dict(r=3, lora_alpha=3, target_modules=["c_attn", "c_fc"], bias="all"),
    "DoRA c_attn, c_proj": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], use_dora=True,
                                rank_pattern={"mlp.c_proj": 3}),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_from_get_peft_model_loads_with_equal_logits(gpt2_dir, tmp_path, case):
    peft = pytest.importorskip("peft", reason="the PEFT oracle needs peft")
    folder, cfg = gpt2_dir
    config = peft.LoraConfig(task_type="CAUSAL_LM", fan_in_fan_out=True, lora_dropout=0.0, **PEFT_CASES[case])
    peft_model = peft.get_peft_model(_from_pretrained(folder), config)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude" in name:  # DoRA: a trained magnitude, away from W0's row norms
                p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=gen, dtype=p.dtype))
            elif "lora_" in name or (case == "bias=all" and name.endswith(".bias")):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    model = hf.load_gpt2(folder, dtype="float64")
    assert hf.load_peft_adapter(tmp_path / "adapter", model, "imported") == "imported"
    assert lora.list_adapters(model) == ["imported"]
    idx, _, _ = _batch(cfg, seed=9)
    assert _rel(_logits_ml(model, idx), _logits_hf(peft_model, idx)) <= TOL
    bare = hf.load_gpt2(folder, dtype="float64")
    with lora.disable_adapters(model):  # PEFT's trained biases became the adapter's Δb: the base is untouched
        assert _rel(_logits_ml(model, idx), _logits_ml(bare, idx)) <= TOL
    assert bool(lora.bias_delta_names(model, "imported")) == ("bias" in case)

    # and back out: minilora's export of what it imported loads in PEFT with the same logits
    hf.save_peft_adapter(tmp_path / "again", model, "imported")
    again = peft.PeftModel.from_pretrained(_from_pretrained(folder), tmp_path / "again").eval()
    assert _rel(_logits_ml(model, idx), _logits_hf(again, idx)) <= TOL


def test_sharded_and_bfloat16_checkpoints_written_by_transformers_load(tmp_path):
    cfg = CONFIGS["d32-L2-H4"]
    ref = _hf_model(cfg, seed=4)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")  # several model-0000k-of-0000n files + index
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    idx, _, _ = _batch(cfg, seed=2)
    assert _rel(_logits_ml(hf.load_gpt2(tmp_path / "sharded", dtype="float64"), idx), _logits_hf(ref, idx)) <= TOL
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = hf.load_gpt2(tmp_path / "bf16", dtype=None)  # NumPy has no bfloat16: exactly widened to float32
    assert model.wte.weight.dtype == np.float32
    expected = hf.checkpoint.from_hf_state({n: p.detach().float().numpy() for n, p in ref.named_parameters()},
                                           model.config, "bf16")
    for name, p in model.named_parameters():
        assert np.array_equal(p.data, expected[name]), name


def test_load_tokenizer_matches_transformers_gpt2_tokenizer_on_both_layouts(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="load_tokenizer needs the tokenizers package")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    corpus = ["The Eagle is a French restaurant near the river.", "Cheap food, friendly staff; 5 stars!",
              "Café Déjà Vu serves crème brûlée — naïvely good."] * 20
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.model.save(str(tmp_path))  # vocab.json + merges.txt: GPT-2's own layout
    reference = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    legacy = hf.load_tokenizer(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    single = hf.load_tokenizer(tmp_path)
    for text in corpus[:3] + ["unseen: Zürich 東京 🙂", "  two  spaces\nand a newline"]:
        ids = reference.encode(text)
        assert legacy.encode(text) == ids and single.encode(text) == ids, text
        assert single.decode(ids) == reference.decode(ids) == text


# ----------------------------------------------------------------------------- PiSSA across the bridge
PISSA_EXPORT = {
    "q,v": dict(r=2, alpha=4.0, target_modules=("q", "v")),
    "q,k,v,o,fc rsLoRA": dict(r=2, alpha=3.0, use_rslora=True, target_modules=("q", "k", "v", "o", "fc")),
    "DoRA q,v,proj": dict(r=2, alpha=4.0, use_dora=True, target_modules=("q", "v", "proj")),
}


@pytest.mark.parametrize("case", sorted(PISSA_EXPORT))
def test_a_pissa_adapter_exports_as_a_rank_2r_lora_that_peft_loads_on_the_original_base(gpt2_dir, tmp_path, case):
    """W_res + s·B·A = W0 + s·[B | −B0]·[A ; A0]: PEFT's own conversion, on the untouched base."""
    peft = pytest.importorskip("peft", reason="the PEFT oracle needs peft")
    folder, cfg = gpt2_dir
    model = hf.load_gpt2(folder, dtype="float64")
    lora.apply_lora(model, lora.LoRAConfig(init="pissa", **PISSA_EXPORT[case]))
    _randomise_adapter(model, "default", seed=13)  # trained: A and B away from the SVD start
    hf.save_peft_adapter(tmp_path / "adapter", model)
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["init_lora_weights"] is True  # a plain LoRA: PEFT must not re-run PiSSA's SVD
    from safetensors.numpy import load_file
    ranks = [a.shape[0] for k, a in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items() if ".lora_A." in k]
    assert sum(ranks) == 2 * PISSA_EXPORT[case]["r"] * len(lora.lora_layers(model))  # [A ; A0] in every layer
    peft_model = peft.PeftModel.from_pretrained(_from_pretrained(folder), tmp_path / "adapter").eval()
    idx, _, _ = _batch(cfg, seed=4)
    ours = _logits_ml(model, idx)
    assert _rel(ours, _logits_ml(hf.load_gpt2(folder, dtype="float64"), idx)) > 1e-3
    assert _rel(ours, _logits_hf(peft_model, idx)) <= TOL
    # the base the export writes is the original W0, not the residual the PiSSA weight holds
    hf.save_gpt2(tmp_path / "base", model)
    assert _rel(_logits_hf(_from_pretrained(tmp_path / "base"), idx), _logits_hf(_from_pretrained(folder), idx)) <= TOL
    on_written = peft.PeftModel.from_pretrained(_from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    assert _rel(ours, _logits_hf(on_written, idx)) <= TOL


PISSA_TOL = 1e-5  # PEFT runs PiSSA's SVD in float32 (it refuses float64), minilora's conversion in float64


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("kw", [dict(r=2, lora_alpha=4, target_modules=["c_attn"]),
                                dict(r=2, lora_alpha=2, target_modules=["c_attn", "c_fc"], use_rslora=True,
                                     rank_pattern={"mlp.c_fc": 3})])
def test_a_peft_pissa_adapter_imports_as_the_exact_lora_on_the_original_base(gpt2_dir, tmp_path, trained, kw):
    peft = pytest.importorskip("peft", reason="the PEFT oracle needs peft")
    folder, cfg = gpt2_dir
    base = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    config = peft.LoraConfig(task_type="CAUSAL_LM", fan_in_fan_out=True, lora_dropout=0.0, init_lora_weights="pissa", **kw)
    peft_model = peft.get_peft_model(base, config)
    if trained:
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    idx, _, _ = _batch(cfg, seed=6)
    expected = _logits_hf(peft_model, idx)
    reloaded = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval(), tmp_path / "adapter").eval()
    assert _rel(_logits_hf(reloaded, idx), expected) <= PISSA_TOL  # PEFT re-runs the SVD on load
    model = hf.load_gpt2(folder, dtype="float32")
    hf.load_peft_adapter(tmp_path / "adapter", model, "imported")
    assert _rel(_logits_ml(model, idx), expected) <= PISSA_TOL
    if trained:
        assert _rel(expected, _logits_ml(hf.load_gpt2(folder, dtype="float32"), idx)) > 1e-3
    with lora.disable_adapters(model):  # W0 itself is untouched: the adapter is a LoRA on it
        assert _rel(_logits_ml(model, idx), _logits_ml(hf.load_gpt2(folder, dtype="float32"), idx)) <= 1e-6
