"""Composite ops with fused, hand-written backward passes.

Each could be written with the primitives of ``minilora.ops`` and autograd would
differentiate it; here each is ONE Function whose backward is derived by hand
(the derivation is in the docstring), which is both faster (fewer temporaries,
fewer graph nodes) and what a student should be able to write. The tests check
every one against autograd through the primitives and against finite differences.

Shapes: ``x`` may have any number of leading batch dimensions; the last axis is
the feature axis. Linear weights are (out, in): y = x Wᵀ + b, so W ∈ R^{d×k} as in
the paper.

``lora_linear`` (h = W₀x + b + (α/r)·B·A·drop(x)) is the LoRA package's op, defined with its
backward in ``minilora/lora/function.py``; ``F.lora_linear`` calls it.
"""

from __future__ import annotations

import math

import numpy as np

from . import backend as bk
from .backend import dropout_mask, get_array_module  # dropout_mask: F.dropout_mask, also LoRA's
from .function import Function
from .tensor import RowGradient, Tensor

__all__ = [
    "linear",
    "lora_linear",
    "gelu",
    "layer_norm",
    "softmax",
    "log_softmax",
    "cross_entropy",
    "embedding",
    "dropout",
    "dropout_mask",
    "scaled_dot_product_attention",
]


def _rows(a):
    """View (..., n) as (N, n): one BLAS call instead of a batch of small ones."""
    return a.reshape(-1, a.shape[-1])


def _check_features(name, x, weight, bias=None):
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: input has {x.shape[-1]} features (shape {tuple(x.shape)}) but the weight of shape "
            f"{tuple(weight.shape)} expects {weight.shape[1]} (in_features); weights are (out_features, in_features)"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias of shape {tuple(bias.shape)} does not fit a weight of shape "
                         f"{tuple(weight.shape)}; it must be ({weight.shape[0]},) (out_features)")


# ----------------------------------------------------------------------------- linear
class Linear(Function):
    """y = x Wᵀ + b.   dx = g W,   dW = gᵀ x,   db = Σ_rows g."""

    fresh_grads = True  # three new arrays: two matmul outputs and a sum

    def forward(self, x, weight, bias=None):
        _check_features("linear", x, weight, bias)
        self.save_for_backward(x, weight)
        y = _rows(x) @ weight.T
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, grad):
        x, weight = self.saved
        need_x, need_w, need_b = self.needs_input_grad
        g = _rows(grad)
        dx = (g @ weight).reshape(x.shape) if need_x else None
        dw = g.T @ _rows(x) if need_w else None
        db = g.sum(axis=0) if need_b else None
        return dx, dw, db


def linear(x, weight, bias=None):
    """y = x Wᵀ + b with W of shape (out_features, in_features)."""
    return Linear.apply(x, weight, bias)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout=0.0, training=False):
    """h = x W₀ᵀ + b + scaling · drop(x) Aᵀ Bᵀ — the LoRA layer in one fused op (eq. 3).

    The op and its hand-written backward are ``LoRALinearFn`` in ``minilora/lora/function.py``.
    It is imported when called: the lora package imports nn, which imports this module, so an
    import at the top would be a cycle.
    """
    from .lora.function import lora_linear as fused_lora_linear  # noqa: PLC0415

    return fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout=dropout, training=training)


# ----------------------------------------------------------------------------- GELU
_GELU_C = math.sqrt(2.0 / math.pi)  # a Python float: keeps float32 arrays float32
_GELU_A = 0.044715


_BLOCK_ELEMENTS = 1 << 16  # ~256 kB of float32: a block and its temporaries stay in the L2 cache


def _gelu_into(xp, x, y, h, w=None):
    """y = x h with h = ½ (1 + tanh(c (x + a x³))); with scratch ``w``, h is then turned into dy/dx.

    Every step is an in-place pass (``out=``): no temporaries beyond the arrays passed in.
    """
    xp.multiply(x, x, out=h)
    h *= _GELU_A * _GELU_C
    h += _GELU_C
    h *= x  # z = c (x + a x³)
    xp.tanh(h, out=h)  # t
    h += 1.0
    h *= 0.5  # h = ½ (1 + t)
    xp.multiply(x, h, out=y)
    if w is not None:
        xp.multiply(x, x, out=w)
        w *= 6.0 * _GELU_A * _GELU_C
        w += 2.0 * _GELU_C  # 2c (1 + 3 a x²)
        w *= y  # w = 2c (1 + 3 a x²) · x h
        xp.subtract(1.0, w, out=w)  # 1 − w
        h -= 1.0
        h *= w
        h += 1.0  # dy/dx = 1 + (h − 1)(1 − w)


class GELU(Function):
    """GPT-2's GELU, tanh form: y = ½ x (1 + tanh(c (x + a x³))), c = √(2/π), a = 0.044715.

    With t = tanh(c (x + a x³)) and h = ½ (1 + t) (so y = x h):
        dy/dx = ½ (1 + t) + ½ x (1 − t²) c (1 + 3 a x²)
              = h + 2 c x h (1 − h) (1 + 3 a x²)          (½ (1 − t²) = 2 h (1 − h))
              = 1 + (h − 1)(1 − w),   w = 2 c (1 + 3 a x²) · y.
    Fast paths (see docs/performance.md):
    - when a gradient will be needed, the forward pass computes dy/dx right away, while x and
      h are at hand, and saves only that one array; the backward pass is one product, g · dy/dx;
    - on the CPU a large input is processed in blocks of rows of ~256 kB, so the ~15 passes
      over a block run in the L2 cache instead of streaming the whole array from memory 15
      times. The arithmetic is the same per element, so the result is bit-identical.
    """

    def forward(self, x):
        xp = get_array_module(x)
        need_grad = self.needs_input_grad[0]
        y = xp.empty_like(x)
        h = xp.empty_like(x)  # becomes dy/dx (saved) when a gradient is needed, else scratch
        n_features = x.shape[-1] if x.ndim else 1
        rows = max(1, _BLOCK_ELEMENTS // n_features)
        if xp is np and x.ndim >= 2 and x.flags.c_contiguous and x.size > 2 * _BLOCK_ELEMENTS:
            x2, y2, h2 = (a.reshape(-1, n_features) for a in (x, y, h))
            w = xp.empty((rows, n_features), dtype=x.dtype) if need_grad else None
            for start in range(0, x2.shape[0], rows):
                block = slice(start, start + rows)
                n = x2[block].shape[0]
                _gelu_into(xp, x2[block], y2[block], h2[block], None if w is None else w[:n])
        else:
            _gelu_into(xp, x, y, h, xp.empty_like(x) if need_grad else None)
        if need_grad:
            self.save_for_backward(h)
        return y

    def backward(self, grad):
        (dydx,) = self.saved
        return grad * dydx


def gelu(x):
    return GELU.apply(x)


# ----------------------------------------------------------------------------- LayerNorm
class LayerNorm(Function):
    """y = x̂ w + b,  x̂ = (x − μ) / √(σ² + eps) over the last axis (C features).

    With ĝ = g w (the gradient reaching x̂) and mean over the feature axis:
        dx = (ĝ − mean(ĝ) − x̂ · mean(ĝ x̂)) / √(σ² + eps)
        dw = Σ_rows g x̂,   db = Σ_rows g.
    Fast paths: the per-row sums over the features are matrix-vector products (one BLAS
    call, no temporary): Σ_c x_c = x @ 1, mean(ĝ) = (g @ w) / C and mean(ĝ x̂) = ((g x̂) @ w) / C,
    because ĝ x̂ = (g x̂) w; the product g x̂ is formed once and serves dw as well.
    """

    def forward(self, x, weight, bias, eps=1e-5):
        for what, p in (("weight", weight), ("bias", bias)):
            if p is not None and p.shape != x.shape[-1:]:
                raise ValueError(f"layer_norm: {what} of shape {tuple(p.shape)} does not match the last axis of input "
                                 f"{tuple(x.shape)}; it must be {tuple(x.shape[-1:])}")
        xp = get_array_module(x)
        inv_c = xp.full(x.shape[-1], 1.0 / x.shape[-1], dtype=x.dtype)  # x @ inv_c = the mean over the last axis
        xc = x - (x @ inv_c)[..., None]  # x − μ
        var = (xc * xc) @ inv_c  # σ² (biased, as in GPT-2)
        rstd = 1.0 / xp.sqrt(var + eps)
        xhat = xc
        xhat *= rstd[..., None]
        rstd = rstd[..., None]
        self.save_for_backward(xhat, rstd, weight)
        y = xhat * weight if weight is not None else xhat.copy()
        if bias is not None:
            y += bias
        return y

    def backward(self, grad):
        xhat, rstd, weight = self.saved
        need_x, need_w, need_b = self.needs_input_grad
        xp = get_array_module(grad)
        dx = dw = db = None
        g_xhat = grad * xhat if (need_x or need_w) else None  # g x̂: dw's product, and ĝ x̂ = (g x̂) w
        if need_x:
            n = grad.shape[-1]
            w = weight if weight is not None else xp.ones(n, dtype=grad.dtype)
            mean_g_hat = (grad @ w) / n  # mean(ĝ) per row
            mean_g_hat_xhat = (g_xhat @ w) / n  # mean(ĝ x̂) per row
            dx = grad * w  # ĝ
            dx -= mean_g_hat[..., None]
            dx -= xhat * mean_g_hat_xhat[..., None]
            dx *= rstd
        if need_w:
            dw = _rows(g_xhat).sum(axis=0)
        if need_b:
            db = _rows(grad).sum(axis=0)
        return dx, dw, db


def layer_norm(x, weight, bias, eps=1e-5):
    return LayerNorm.apply(x, weight, bias, eps=eps)


# ----------------------------------------------------------------------------- softmax
def _softmax(x, axis):
    xp = get_array_module(x)
    e = x - x.max(axis=axis, keepdims=True)  # stable: the largest logit becomes 0
    xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def log_softmax_array(x, axis):
    xp = get_array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    shifted -= xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    return shifted


class Softmax(Function):
    """y = exp(x − max) / Σ exp(x − max);  dx = y ⊙ (g − Σ g y)."""

    def forward(self, x, axis=-1):
        self.axis = axis
        y = _softmax(x, axis)
        self.save_for_backward(y)
        return y

    def backward(self, grad):
        (y,) = self.saved
        dx = grad - (grad * y).sum(axis=self.axis, keepdims=True)
        dx *= y
        return dx


class LogSoftmax(Function):
    """y = x − logsumexp(x);  dx = g − softmax(x) Σ g."""

    def forward(self, x, axis=-1):
        self.axis = axis
        y = log_softmax_array(x, axis)
        self.save_for_backward(y)
        return y

    def backward(self, grad):
        (y,) = self.saved
        xp = get_array_module(y)
        return grad - xp.exp(y) * grad.sum(axis=self.axis, keepdims=True)


def softmax(x, axis=-1):
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    return LogSoftmax.apply(x, axis=axis)


# ----------------------------------------------------------------------------- cross-entropy
class CrossEntropy(Function):
    """Mean token NLL over counted positions (eq. 1/2 of the paper: the loss of the y tokens).

    For a counted row with log-probabilities ℓ = log_softmax(z) and target t, the
    smoothed target is q = (1 − ε) onehot(t) + ε/V and the loss is −Σ_v q_v ℓ_v.
    The mean is over counted rows (weight w_i: the mask, 0 for prompt/padding).
    Backward: dz_i = w_i (softmax(z_i) − q_i) / Σ w.
    """

    def forward(self, logits, targets, weights, label_smoothing=0.0):
        xp = get_array_module(logits)
        V = logits.shape[-1]
        z = _rows(logits)
        t = targets.reshape(-1)
        w = weights.reshape(-1)
        total = w.sum()
        if float(total) <= 0:
            raise ValueError("cross_entropy: no token is counted (the mask / ignore_index removes every position)")
        logp = log_softmax_array(z, axis=-1)
        rows = xp.arange(t.shape[0])
        t_safe = xp.where(w != 0, t, 0)  # ignored positions may hold any id (e.g. -100)
        nll = -logp[rows, t_safe]
        if label_smoothing:
            nll *= 1.0 - label_smoothing
            nll -= (label_smoothing / V) * logp.sum(axis=-1)
        loss = (nll * w).sum() / total
        self.save_for_backward(logp, t_safe, w)
        self.total, self.smoothing, self.in_shape = total, label_smoothing, logits.shape
        return xp.asarray(loss, dtype=logits.dtype)

    def backward(self, grad):
        logp, t, w = self.saved
        xp = get_array_module(logp)
        dz = xp.exp(logp)  # softmax
        if self.smoothing:
            dz -= self.smoothing / logp.shape[-1]
        dz[xp.arange(t.shape[0]), t] -= 1.0 - self.smoothing
        dz *= (w * (grad / self.total))[:, None]
        return dz.reshape(self.in_shape), None, None


def cross_entropy(logits, targets, mask=None, ignore_index=None, label_smoothing=0.0):
    """Mean NLL of integer ``targets`` under ``logits`` (..., V) over counted positions.

    mask: 1 (or a weight) where the token counts — the y tokens of eq. 2 — and 0 on
    prompt and padding; ignore_index: a target id that never counts (e.g. -100).
    """
    data = logits.data if isinstance(logits, Tensor) else logits
    xp = get_array_module(data)
    targets = targets.data if isinstance(targets, Tensor) else xp.asarray(targets)
    V = data.shape[-1]
    if targets.shape != data.shape[:-1]:
        raise ValueError(f"cross_entropy: targets of shape {tuple(targets.shape)} do not match logits {tuple(data.shape)} minus the class axis")
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"cross_entropy: targets must be integer class ids, got dtype {targets.dtype}")
    if mask is None:
        weights = xp.ones(targets.shape, dtype=data.dtype)
    else:
        mask = mask.data if isinstance(mask, Tensor) else xp.asarray(mask)
        if mask.shape != targets.shape:
            raise ValueError(f"cross_entropy: mask of shape {tuple(mask.shape)} does not match targets {tuple(targets.shape)}")
        weights = mask.astype(data.dtype)
    if ignore_index is not None:
        weights = weights * (targets != ignore_index)
    counted = targets[weights != 0]
    if counted.size and (int(counted.min()) < 0 or int(counted.max()) >= V):
        bad = int(counted.max()) if int(counted.max()) >= V else int(counted.min())
        raise ValueError(
            f"cross_entropy: target id {bad} is outside the {V} classes of the logits (valid ids 0..{V - 1}); "
            "check the tokenizer's vocab_size against the model's vocab_size"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    return CrossEntropy.apply(logits, targets, weights, label_smoothing=float(label_smoothing))


# ----------------------------------------------------------------------------- embedding
# The backward's path, by a measured rule (1 BLAS thread, D = 128; the figures are in
# docs/performance.md): the one-hot matmul one_hotᵀ·g beats the scatter-add while V ≤ 256, loses
# from V ≈ 400-500 on, and costs an N × V array; so it is used only for a small V AND a small N·V.
# Otherwise (GPT-2's V = 50,257 always) the rows and their gradients (tensor.RowGradient): the autograd
# adds them into the touched rows of the table's gradient.
_ONE_HOT_MAX_VOCAB = 256
_ONE_HOT_MAX_ELEMENTS = 1 << 22  # N·V: at most 16 MB of float32 one-hot


def _one_hot_pays(n_ids: int, vocab: int) -> bool:
    return vocab <= _ONE_HOT_MAX_VOCAB and n_ids * vocab <= _ONE_HOT_MAX_ELEMENTS


class Embedding(Function):
    """out = W[ids];  dW[v] = Σ_{i: ids_i = v} g_i (repeated ids accumulate)."""

    def forward(self, ids, weight):
        self.save_for_backward(ids)
        self.weight_shape = weight.shape
        return weight[ids]

    def backward(self, grad):
        (ids,) = self.saved
        xp = get_array_module(grad)
        V, D = self.weight_shape
        flat_ids, g = ids.reshape(-1), grad.reshape(-1, D)
        if _one_hot_pays(flat_ids.shape[0], V):
            one_hot = xp.zeros((flat_ids.shape[0], V), dtype=grad.dtype)
            one_hot[xp.arange(flat_ids.shape[0]), flat_ids] = 1.0
            return None, one_hot.T @ g
        return None, RowGradient(flat_ids, g, self.weight_shape)  # the rows it touches, not a dense (V, D) array


def embedding(ids, weight):
    """Rows of ``weight`` (V, D) picked by integer ``ids`` of any shape -> (..., D)."""
    w = weight.data if isinstance(weight, Tensor) else weight
    ids = ids.data if isinstance(ids, Tensor) else get_array_module(w).asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= w.shape[0]):
        raise ValueError(f"embedding: id {int(ids.max()) if int(ids.max()) >= w.shape[0] else int(ids.min())} is outside the table of {w.shape[0]} rows")
    return Embedding.apply(ids, weight)


# ----------------------------------------------------------------------------- dropout
class Dropout(Function):
    def forward(self, x, p):
        self.mask = dropout_mask(x.shape, p, x.dtype, backend=bk.backend_of(x))
        return x * self.mask

    def backward(self, grad):
        return grad * self.mask


def dropout(x, p: float, training: bool):
    """Inverted dropout: zero each element with probability p and scale the rest by 1/(1-p).

    Identity (the same tensor, no graph node) when not training or p == 0; the mask
    comes from the backend's seeded RNG, so ``ml.manual_seed`` makes it reproducible.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    return Dropout.apply(x, p=p)


# ----------------------------------------------------------------------------- attention
_mask_cache: dict = {}


def causal_mask(t_query: int, t_key: int, dtype, xp):
    """Additive mask (t_query, t_key): 0 where query i may see key j, −inf elsewhere.

    Queries are the LAST t_query positions of the t_key keys (t_query < t_key during
    cached generation), so query i sits at absolute position t_key − t_query + i.
    Adding a precomputed mask is faster than boolean assignment (docs/performance.md).
    """
    key = (t_query, t_key, np.dtype(dtype).str, xp.__name__)
    mask = _mask_cache.get(key)
    if mask is None:
        offset = t_key - t_query
        allowed = xp.arange(t_key)[None, :] <= (xp.arange(t_query)[:, None] + offset)
        mask = xp.where(allowed, 0.0, -np.inf).astype(dtype)
        _mask_cache[key] = mask
    return mask


class ScaledDotProductAttention(Function):
    """o = softmax(q kᵀ / √d + M) v  (M: the causal mask), per batch and head.

    Backward, with P the attention weights and g = ∂L/∂o:
        dv = Pᵀ g,   dP = g vᵀ,   dS = P ⊙ (dP − Σ_j dP P),   dq = dS k / √d,   dk = dSᵀ q / √d.
    """

    def forward(self, q, k, v, causal=True):
        xp = get_array_module(q, k, v)
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = (q * scale) @ k.swapaxes(-1, -2)  # (B, H, Tq, Tk); scaling q is the smaller pass
        if causal:
            scores += causal_mask(q.shape[-2], k.shape[-2], scores.dtype, xp)
        # softmax in place on the one (B, H, Tq, Tk) buffer: no temporaries of that size
        scores -= scores.max(axis=-1, keepdims=True)
        xp.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        attn = scores
        self.save_for_backward(q, k, v, attn)
        self.scale = scale
        return attn @ v  # (B, H, Tq, Dh)

    def backward(self, grad):
        q, k, v, attn = self.saved
        need_q, need_k, need_v = self.needs_input_grad
        dv = attn.swapaxes(-1, -2) @ grad if need_v else None
        d_scores = grad @ v.swapaxes(-1, -2)  # dP
        d_scores -= (d_scores * attn).sum(axis=-1, keepdims=True)
        d_scores *= attn  # dS (without the 1/√d, applied to the smaller dq and dk)
        dq = dk = None
        if need_q:
            dq = d_scores @ k
            dq *= self.scale
        if need_k:
            dk = d_scores.swapaxes(-1, -2) @ q
            dk *= self.scale
        return dq, dk, dv


def scaled_dot_product_attention(q, k, v, causal=True):
    """Attention over (..., T, head_dim) tensors; causal masks future keys."""
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(
            f"scaled_dot_product_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
            "(the same batch/head axes for all three, q and k the same head_dim, k and v the same length)"
        )
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(
            f"scaled_dot_product_attention: causal attention with q {tuple(q.shape)} and k {tuple(k.shape)} has "
            f"{q.shape[-2]} queries but only {k.shape[-2]} keys; the queries are the last positions of the keys, "
            "so there must be at least as many keys"
        )
    return ScaledDotProductAttention.apply(q, k, v, causal=causal)
