"""The fine-tuning methods (the paper's baselines, full, LoRA): parameter formulas, gradients (float64 gradcheck), start-equal-to-base, PreEmbed lengths."""

import numpy as np
import pytest
from conftest import assert_close, to_np

import minilora as ml
from minilora import backend as bk
from minilora import functional as F
from minilora.methods import (
    HYPERPARAMS,
    METHODS,
    PreEmbedGPT,
    apply_method,
    bottleneck_adapter,
    expected_trainable,
    gather_positions,
    insert_prompt_vectors,
    randomize_zero_init,
)
from minilora.generate import generate
from minilora.models import GPT, GPTConfig
from minilora.recipes import finetune

TINY = GPTConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, d_model=8)
SEP = 3  # the separator id used with TINY
IDX = np.array([[1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 1, 1]])  # separators at t = 2 and t = 1
TARGETS = np.roll(IDX, -1, axis=1)
MASK = np.ones(IDX.shape)


def tiny_model(dtype="float64", scale=4.0):
    """A tiny GPT whose weights are large enough that every input visibly moves the output."""
    model = GPT(TINY).to(dtype=dtype)
    for name, p in model.named_parameters():
        if name.endswith(".weight") and ".ln" not in name and not name.startswith("ln_f"):
            p.data *= scale
    return model


def hp_for(method):
    return {"sep_id": SEP} if method == "preembed" else {}


# ----------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("cfg", [TINY, GPTConfig()], ids=["tiny", "shipped-size"])
@pytest.mark.parametrize("method, hp", [
    ("lora", {"r": 1, "targets": ("q",)}), ("lora", {"r": 4, "targets": ("q", "v")}),
    ("lora", {"r": 2, "targets": ("q", "k", "v", "o")}),
    ("adapter_h", {"r": 1}), ("adapter_h", {"r": 4}), ("adapter_h", {"r": 3, "train_layer_norms": False}),
    ("adapter_l", {"r": 2}), ("adapter_l", {"r": 8}),
    ("preembed", {"l_p": 2, "l_i": 1}), ("preembed", {"l_p": 0, "l_i": 3}), ("preembed", {"l_p": 3, "l_i": 0}),
])
def test_trainable_counts_follow_the_papers_formulas(cfg, method, hp):
    model = apply_method(GPT(cfg), method, **hp)
    n = model.num_parameters(trainable_only=True)
    assert n == expected_trainable(method, cfg, **hp)
    d, L = cfg.d_model, cfg.n_layer
    if method == "lora":  # 2·L̂·d·r
        assert n == 2 * (len(hp["targets"]) * L) * d * hp["r"]
    elif method == "preembed":  # d·(l_p + l_i)
        assert n == d * (hp["l_p"] + hp["l_i"])
    else:  # L̂_Adpt·(2·d·r + r + d) + 2·L̂_LN·d
        r = hp["r"]
        n_adapters = 2 * L if method == "adapter_h" else L
        n_ln = 0 if hp.get("train_layer_norms") is False else n_adapters
        assert n == n_adapters * (2 * d * r + r + d) + 2 * n_ln * d


def test_counts_of_full_top2_and_bitfit():
    cfg = GPTConfig(vocab_size=11, block_size=12, n_layer=3, n_head=2, d_model=8)
    total = GPT(cfg).num_parameters()
    assert apply_method(GPT(cfg), "full").num_parameters(trainable_only=True) == total
    model = apply_method(GPT(cfg), "ft_top2")
    top2 = model.num_parameters(trainable_only=True)
    assert top2 == sum(p.size for name, p in model.named_parameters() if name.startswith(("blocks.1.", "blocks.2.")))
    assert all(name.startswith(("blocks.1.", "blocks.2.")) for name, _ in model.named_parameters(trainable_only=True))
    model = apply_method(GPT(cfg), "bitfit")
    n_bias = model.num_parameters(trainable_only=True)
    d, L = cfg.d_model, cfg.n_layer
    # per block: q, k, v, o (d each), fc (4d), proj (d), ln1, ln2 (d each); plus ln_f
    assert n_bias == L * (4 * d + 4 * d + d + 2 * d) + d
    assert all(name.endswith(".bias") for name, _ in model.named_parameters(trainable_only=True))


@pytest.mark.parametrize("method, marks", [
    ("adapter_h", (".adapter.", ".ln1.", ".ln2.")), ("adapter_l", (".adapter.",)), ("preembed", ("preembed.",)),
    ("lora", (".lora_A.", ".lora_B.")),
])
def test_only_the_methods_own_parameters_train(method, marks):
    model = apply_method(GPT(TINY), method, **hp_for(method))
    names = [n for n, _ in model.named_parameters(trainable_only=True)]
    assert names and all(any(m in n for m in marks) for n in names)
    assert "blocks.0.attn.o.weight" in dict(model.named_parameters())  # base names are unchanged
    assert not dict(model.named_parameters())["blocks.0.attn.o.weight"].requires_grad


def test_base_checkpoint_loads_into_an_adapted_model():
    base = GPT(TINY)
    model = apply_method(GPT(TINY), "adapter_h")
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".adapter." in n for n in missing)


def test_apply_method_rejects_unknown_methods_and_hyperparameters():
    with pytest.raises(ValueError, match="unknown method"):
        apply_method(GPT(TINY), "prefix_tuning")
    with pytest.raises(TypeError, match="unknown hyper-parameters"):
        apply_method(GPT(TINY), "adapter_l", rank=4)
    with pytest.raises(ValueError, match="bottleneck width"):
        apply_method(GPT(TINY), "adapter_h", r=0)
    model = apply_method(GPT(TINY), "adapter_h")
    with pytest.raises(TypeError, match="applied already"):
        apply_method(model, "adapter_l")
    with pytest.raises(TypeError, match="got PreEmbedGPT"):
        apply_method(apply_method(GPT(TINY), "preembed", sep_id=SEP), "lora")


def test_the_options_each_method_takes_are_read_from_its_function_and_cover_its_row_of_the_table():
    """``OPTIONS`` comes from the per-method functions of ``APPLY``; the unknown-option error lists them."""
    from minilora.methods import APPLY, OPTIONS, TRAINING_KEYS

    assert set(APPLY) == set(METHODS) == set(OPTIONS) == set(HYPERPARAMS)
    for method in METHODS:
        own = {k for k in HYPERPARAMS[method] if k not in TRAINING_KEYS}
        assert own <= set(OPTIONS[method]), method
    assert OPTIONS["lora"] == ("adapter_name", "alpha", "dropout", "init", "r", "targets")
    assert OPTIONS["adapter_h"] == ("r", "train_layer_norms") and OPTIONS["full"] == OPTIONS["bitfit"] == ()
    with pytest.raises(TypeError, match=r"unknown hyper-parameters \['rank'\]; it takes \['adapter_name', 'alpha', "
                                        r"'dropout', 'init', 'r', 'targets'\]"):
        apply_method(GPT(TINY), "lora", rank=4)
    with pytest.raises(TypeError, match=r"apply_method\('bitfit'\): unknown hyper-parameters \['r'\]; it takes none"):
        apply_method(GPT(TINY), "bitfit", r=4, lr=0.1)  # a training key is accepted and ignored


def test_lora_defaults_have_one_home_the_table_and_the_cli_reads_it(monkeypatch):
    """r and targets from ``HYPERPARAMS["lora"]``, alpha = ``lora_alpha(r)`` = 2r: in apply_method and the CLI."""
    from minilora import cli
    from minilora.methods import lora_alpha

    assert lora_alpha(4) == 8.0 and lora_alpha(4, 3) == 3.0 and isinstance(lora_alpha(4), float)
    model = apply_method(GPT(TINY), "lora")
    layers = ml.lora.lora_layers(model)
    assert [p.rsplit(".", 1)[1] for p, _ in layers] == list(HYPERPARAMS["lora"]["targets"]) * TINY.n_layer
    assert all(layer.scaling("default") == lora_alpha(HYPERPARAMS["lora"]["r"]) / HYPERPARAMS["lora"]["r"]
               for _, layer in layers)
    args = cli.build_parser().parse_args(["finetune", "--task", "e2e"])
    assert (args.r, args.targets, args.alpha) == (HYPERPARAMS["lora"]["r"], HYPERPARAMS["lora"]["targets"], None)
    monkeypatch.setitem(HYPERPARAMS, "lora", {**HYPERPARAMS["lora"], "r": 6, "targets": ("k",)})
    args = cli.build_parser().parse_args(["finetune", "--task", "e2e"])
    assert (args.r, args.targets) == (6, ("k",))
    model = apply_method(GPT(TINY), "lora")
    assert {p.rsplit(".", 1)[1] for p, _ in ml.lora.lora_layers(model)} == {"k"}
    assert model.num_parameters(trainable_only=True) == 2 * TINY.n_layer * TINY.d_model * 6


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gradchecks_on_a_tiny_gpt(method):
    """d loss / d Θ of the whole model, for exactly the parameters the method trains (float64)."""
    ml.manual_seed(0)
    model = apply_method(tiny_model(), method, **hp_for(method))
    randomize_zero_init(model, std=0.5)  # B = 0 and up = 0 start at the base; a gradcheck needs them non-zero
    params = model.parameters(trainable_only=True)
    if method in ("full", "ft_top2"):  # every parameter of a block is gradchecked elsewhere; sample a few
        params = params[:2] + params[-4:]
    assert ml.gradcheck(lambda *_: model.loss(IDX, TARGETS, MASK), params, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("with_residual", [False, True])
def test_bottleneck_adapter_gradcheck(backend, with_residual):
    ml.manual_seed(0)
    d, r = 5, 3
    x = ml.tensor(bk.random_normal((2, 4, d), "float64"), requires_grad=True)
    inputs = [x] + [ml.tensor(bk.random_normal(s, "float64"), requires_grad=True)
                    for s in ((r, d), (r,), (d, r), (d,))]
    if with_residual:
        inputs.append(ml.tensor(bk.random_normal((2, 4, d), "float64"), requires_grad=True))
    assert ml.gradcheck(lambda *a: bottleneck_adapter(*a), inputs)


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_bottleneck_equals_autograd_through_primitives(backend, with_residual):
    ml.manual_seed(1)
    d, r = 6, 2
    shapes = ((3, 5, d), (r, d), (r,), (d, r), (d,), (3, 5, d))
    a = [ml.tensor(bk.random_normal(s, "float64"), requires_grad=True) for s in shapes]
    b = [ml.tensor(t.data.copy(), requires_grad=True) for t in a]
    res_a, res_b = (a[5], b[5]) if with_residual else (None, b[0])
    fused = bottleneck_adapter(*a[:5], residual=res_a)
    composed = res_b + F.linear(ml.relu(F.linear(b[0], b[1], b[2])), b[3], b[4])
    assert_close(fused.data, composed.data)
    g = bk.random_normal(fused.shape, "float64")
    fused.backward(g)
    composed.backward(g)
    for i, (ta, tb) in enumerate(zip(a, b)):
        if i == 5 and not with_residual:
            continue
        assert_close(ta.grad, tb.grad, what=f"input {i}")


def test_insert_and_gather_gradcheck(backend):
    ml.manual_seed(2)
    C = 3
    x = ml.tensor(bk.random_normal((2, 4, C), "float64"), requires_grad=True)
    prefix = ml.tensor(bk.random_normal((2, C), "float64"), requires_grad=True)
    infix = ml.tensor(bk.random_normal((1, C), "float64"), requires_grad=True)
    xp = bk.xp()
    token_pos = xp.asarray([[2, 3, 5, 6], [2, 4, 5, 6]])  # separators at t = 1 and t = 0
    infix_pos = xp.asarray([[4], [3]])
    out = insert_prompt_vectors(x, prefix, infix, token_pos, infix_pos, 7)
    assert out.shape == (2, 7, C)
    assert_close(out.data[1, 3], infix.data[0]) and assert_close(out.data[0, :2], prefix.data)
    assert ml.gradcheck(lambda a, p, i: insert_prompt_vectors(a, p, i, token_pos, infix_pos, 7), [x, prefix, infix])
    h = ml.tensor(bk.random_normal((2, 7, C), "float64"), requires_grad=True)
    assert ml.gradcheck(lambda t: gather_positions(t, token_pos), [h])


# ----------------------------------------------------------------------------- starting point
@pytest.mark.parametrize("method", ["full", "ft_top2", "bitfit", "adapter_h", "adapter_l", "lora"])
def test_the_adapted_model_starts_equal_to_the_base(backend, method):
    """Adapters' up-projection and LoRA's B start at 0: the first forward pass is the base model's."""
    model = GPT(TINY)
    before = to_np(model(IDX).data)
    assert apply_method(model, method) is model  # in place: only PreEmbed wraps the model
    np.testing.assert_array_equal(to_np(model(IDX).data), before)


# ----------------------------------------------------------------------------- PreEmbed
def test_preembed_shrinks_the_usable_length_and_says_so():
    base = tiny_model()
    model = apply_method(base, "preembed", l_p=2, l_i=1, sep_id=SEP)
    assert isinstance(model, PreEmbedGPT) and model.gpt is base
    assert model.config.block_size == TINY.block_size - 3 and model.preembed.context_size == TINY.block_size
    assert base.config.block_size == TINY.block_size  # the GPT itself is unchanged: it runs the longer input
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in base.named_parameters()] + [
        "preembed.prefix", "preembed.infix"]  # GPT-2's names, then the vectors
    fits = np.array([[1, SEP] + [4] * 7])  # 9 tokens + 3 vectors = 12 positions
    assert model(fits).shape == (1, 9, TINY.vocab_size)
    with pytest.raises(ValueError, match=r"PreEmbed: 10 tokens \+ 2 prefix \+ 1 infix vectors = 13 positions"):
        model(np.array([[1, SEP] + [4] * 8]))
    with pytest.raises(ValueError, match="after the separator"):
        model(np.array([[1, 2, 4, 5]]))


def test_forward_embeddings_is_forward_after_the_token_lookup():
    """PreEmbed runs the GPT through GPT.forward_embeddings: with no vectors inserted it is model(idx) exactly."""
    model = tiny_model()
    np.testing.assert_array_equal(to_np(model.forward_embeddings(model.wte(IDX)).data), to_np(model(IDX).data))


def test_preembed_infix_only_leaves_the_prompt_untouched():
    """With l_p = 0 nothing is inserted before the separator: those outputs equal the base model's.

    The separator's own output is read at the last infix vector (it predicts y₁), so from there on
    the outputs differ.
    """
    base = tiny_model()
    model = tiny_model()
    model.load_state_dict(base.state_dict())
    model = apply_method(model, "preembed", l_p=0, l_i=2, sep_id=SEP)
    out, ref = to_np(model(IDX).data), to_np(base(IDX).data)
    np.testing.assert_allclose(out[0, :2], ref[0, :2], rtol=1e-12, atol=1e-12)  # row 0: sep at t = 2
    np.testing.assert_allclose(out[1, :1], ref[1, :1], rtol=1e-12, atol=1e-12)  # row 1: sep at t = 1
    assert not np.allclose(out[0, 2:], ref[0, 2:])


def test_preembed_prefix_shifts_every_position():
    base = tiny_model()
    model = tiny_model()
    model.load_state_dict(base.state_dict())
    model = apply_method(model, "preembed", l_p=2, l_i=0, sep_id=SEP)
    assert not np.allclose(to_np(model(IDX).data)[:, 0], to_np(base(IDX).data)[:, 0])


def test_preembed_generation_with_and_without_the_cache_agree():
    model = apply_method(tiny_model(), "preembed", l_p=2, l_i=2, sep_id=SEP)
    model.eval()
    prompts = [[1, 2, SEP], [4, 5, SEP]]
    with ml.no_grad():
        cached = generate(model, prompts, max_new_tokens=20)
        plain = generate(model, prompts, max_new_tokens=20, use_cache=False)
    assert cached == plain
    assert all(len(c) == model.config.block_size - 3 for c in cached)  # stops at the usable length


# ----------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize("method", ["adapter_l", "preembed"])
def test_finetune_runs_every_method_and_reports(method):
    base = GPT(GPTConfig(vocab_size=96, block_size=64, n_layer=1, n_head=2, d_model=16))
    run = finetune("classify", method, base=base, steps=2, batch_size=4, n_train=8, n_eval=2,
                   max_new_tokens=2, progress=False)
    assert 0.0 <= run.metric <= 1.0 and run.trainable_params == run.model.num_parameters(trainable_only=True)
    assert run.config["lr"] == HYPERPARAMS[method]["lr"] and run.config["steps"] == 2
    assert np.isfinite(run.eval_loss) and run.eval_loss > 0
    assert base.num_parameters(trainable_only=True) == base.num_parameters()  # the base is untouched


def test_a_task_departure_applies_to_its_task_only_and_gives_way_to_explicit_settings():
    """TASK_HYPERPARAMS: classify's LoRA row differs from the method's; e2e keeps the method's;
    an explicit argument beats both."""
    from minilora.methods import TASK_HYPERPARAMS, hyperparams

    departure = TASK_HYPERPARAMS[("lora", "classify")]
    assert departure and all(HYPERPARAMS["lora"][k] != v for k, v in departure.items())
    assert hyperparams("lora", "e2e") == HYPERPARAMS["lora"] == hyperparams("lora")
    assert hyperparams("lora", "classify") == {**HYPERPARAMS["lora"], **departure}
    assert hyperparams("full", "classify") == {**HYPERPARAMS["full"], **TASK_HYPERPARAMS[("full", "classify")]}
    assert hyperparams("full", "parse") == HYPERPARAMS["full"]
    base = GPT(GPTConfig(vocab_size=96, block_size=64, n_layer=1, n_head=2, d_model=16))
    kw = dict(base=base, batch_size=4, n_train=8, n_eval=2, max_new_tokens=2, progress=False, measure_memory=False)
    run = finetune("classify", "lora", steps=2, **kw)
    assert run.config["lr"] == departure["lr"] and run.config["steps"] == 2
    assert finetune("e2e", "lora", steps=2, **kw).config["lr"] == HYPERPARAMS["lora"]["lr"]
    assert finetune("classify", "lora", steps=2, lr=0.5, **kw).config["lr"] == 0.5
    with pytest.raises(ValueError, match="unknown method 'lorra'"):
        hyperparams("lorra")
