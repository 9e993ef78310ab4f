"""What the LoRA and variant tests share: a tiny float64 GPT, a batch of ids, a short training run,
and the mixed-batch check (a mixed batch == each adapter run alone on its own rows).

Imported by the test modules (``from lora_helpers import ...``), like ``conftest``'s helpers.
"""

from __future__ import annotations

import contextlib

import numpy as np
from conftest import assert_close, to_np

import minilora as ml
from minilora import backend as bk
from minilora import lora, optim
from minilora.models import GPT, GPTConfig


def tiny_gpt(dtype="float64", n_layer=2, d=16, vocab=24, block=8, heads=2, seed=0):
    ml.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=heads, d_model=d)).to(dtype=dtype)


def ids_batch(n_rows, T=8, vocab=24, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (n_rows, T))


def train_steps(model, steps=12, lr=3e-2):
    """``steps`` AdamW steps of next-token loss on one batch of 4 rows: (the losses, the optimizer)."""
    opt = optim.AdamW(model.named_parameters(), lr=lr, weight_decay=0.0)
    idx = ids_batch(4)
    losses = []
    for _ in range(steps):
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


def assert_mixed_batch_equals_each_adapter_alone(model, ids, grad_seed=3):
    """Forward and every LoRA gradient of ``lora.mixed_batch(model, ids)`` == one adapter at a time.

    ids: one adapter name (or "__base__") per row. The upstream gradient is random; the base rows
    reach no trainable parameter (W0 is frozen), so they only take part in the forward check.
    """
    idx = ids_batch(len(ids))
    with lora.mixed_batch(model, ids):
        out = model(idx)
    G = np.random.default_rng(grad_seed).standard_normal(out.shape)
    (out * bk.asarray(G)).sum().backward()  # after the block: the graph remembers each row's adapter
    mixed_out = to_np(out.data)
    mixed_grads = {n: to_np(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    names = sorted(set(ids) - {"__base__"}) + ["__base__"] * ("__base__" in ids)
    for name in names:
        rows = [i for i, n in enumerate(ids) if n == name]
        ctx = lora.disable_adapters(model) if name == "__base__" else contextlib.nullcontext()
        if name != "__base__":
            lora.set_adapter(model, name)
        with ctx:
            ref = model(idx[rows])
            if name != "__base__":
                (ref * bk.asarray(G[rows])).sum().backward()
        assert_close(mixed_out[rows], ref.data, rtol=1e-10, atol=1e-12, what=name)
    separate = {n: to_np(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    assert set(mixed_grads) == set(separate) == set(lora.lora_parameter_names(model))
    for n, grad in mixed_grads.items():
        assert_close(grad, separate[n], rtol=1e-9, atol=1e-12, what=n)
