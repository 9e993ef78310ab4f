"""Diagrams of the paper's ideas, drawn with matplotlib for the tutorials and the course site.

    from minilora.diagrams import draw_reparametrisation, draw_block
    fig = draw_reparametrisation(d=8, k=6, r=2)     # the paper's Fig. 1: h = W₀x + B A x
    fig = draw_block(targets=("q", "v"))            # one GPT-2 block and where the adapters sit

Each function returns a ``matplotlib.figure.Figure`` (the object API: no display needed); save it
with ``minilora.exercises.save_figure``. matplotlib is imported only when a diagram is drawn.
"""

from __future__ import annotations

__all__ = ["draw_reparametrisation", "draw_block"]

FROZEN = "#9ecae1"   # blue: pre-trained, frozen
TRAINED = "#fdae6b"  # orange: LoRA's A and B, trained
PLAIN = "#e5e5e5"    # grey: everything else of the block


def _box(ax, x, y, w, h, label, color, fontsize=10, **kw):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=color,
                                edgecolor="#333333", linewidth=1.0, **kw))
    ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, **kw):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", color="#333333", linewidth=1.2, **kw))


def draw_reparametrisation(d: int = 8, k: int = 6, r: int = 2):
    """The paper's Fig. 1: h = W₀x + B A x, W₀ ∈ R^{d×k} frozen, A ∈ R^{r×k} random, B ∈ R^{d×r} zero.

    The widths are drawn to scale with d, k and r (A and B are thin: r ≪ min(d, k)).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, Polygon

    fig = Figure(figsize=(7.2, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    unit = 0.35  # drawing units per dimension
    wk, wd, wr = k * unit, d * unit, max(r * unit, 0.25)
    # input x (k) at the bottom, output h (d) at the top
    _box(ax, 2.8 - max(wk, 2.0) / 2, 0.0, max(wk, 2.0), 0.45, f"$x \\in \\mathbb{{R}}^{{{k}}}$  (k = {k})", PLAIN,
         fontsize=9)
    _box(ax, 2.8 - max(wd, 2.0) / 2, 6.05, max(wd, 2.0), 0.45, f"$h \\in \\mathbb{{R}}^{{{d}}}$  (d = {d})", PLAIN,
         fontsize=9)
    # frozen W0: a big box on the left
    _box(ax, 0.2, 2.0, 2.6, 2.4, "$W_0 \\in \\mathbb{R}^{d \\times k}$\npre-trained\n(frozen)", FROZEN, fontsize=10)
    # A: a trapezoid from k (bottom) down to r (top); B: from r (bottom) up to d (top)
    cx = 4.9
    ax.add_patch(Polygon([(cx - wk / 2, 1.3), (cx + wk / 2, 1.3), (cx + wr / 2, 2.9), (cx - wr / 2, 2.9)],
                         closed=True, facecolor=TRAINED, edgecolor="#333333"))
    ax.text(cx, 2.0, "$A \\in \\mathbb{R}^{r \\times k}$", ha="center", va="center", fontsize=9)
    ax.text(cx + wk / 2 + 0.15, 1.85, "A random:\n$\\mathcal{N}(0, \\sigma^2)$\n(or uniform)", ha="left", va="center", fontsize=8, color="#7f3b08")
    ax.add_patch(Polygon([(cx - wr / 2, 3.5), (cx + wr / 2, 3.5), (cx + wd / 2, 5.1), (cx - wd / 2, 5.1)],
                         closed=True, facecolor=TRAINED, edgecolor="#333333"))
    ax.text(cx, 4.45, "$B \\in \\mathbb{R}^{d \\times r}$", ha="center", va="center", fontsize=9)
    ax.text(cx + wd / 2 + 0.15, 4.6, "B = 0", ha="left", va="center", fontsize=8, color="#7f3b08")
    ax.text(cx, 3.2, f"r = {r}", ha="center", va="center", fontsize=9, fontweight="bold")
    # the sum
    ax.add_patch(Circle((2.8, 5.55), 0.22, facecolor="white", edgecolor="#333333"))
    ax.text(2.8, 5.55, "+", ha="center", va="center", fontsize=13)
    _arrow(ax, (2.3, 0.45), (1.5, 2.0))
    _arrow(ax, (3.3, 0.45), (cx - 0.3, 1.3))
    _arrow(ax, (1.5, 4.4), (2.62, 5.42))
    _arrow(ax, (cx, 5.1), (3.0, 5.45))
    _arrow(ax, (2.8, 5.77), (2.8, 6.05))
    ax.text(cx + 0.15, 5.35, "× α/r", ha="left", va="bottom", fontsize=9, color="#7f3b08")
    ax.text(0.2, 6.9, "h = W₀x + ΔWx = W₀x + (α/r)·B A x   (eq. 3)", fontsize=11, ha="left")
    ax.text(0.2, -0.45, f"trained: r·(d + k) = {r * (d + k)} numbers instead of d·k = {d * k}\n"
                        "B = 0 at the start, so h = W₀x there: fine-tuning starts at the pre-trained model",
            fontsize=8.5, ha="left", va="top", color="#444444")
    ax.set_xlim(0, 8.2)
    ax.set_ylim(-1.3, 7.2)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("Fig. 1 of the paper: the reparametrisation (blue frozen, orange trained)", fontsize=10, pad=14)
    return fig


def _draw_attention_half(ax, linear, targets) -> None:
    """The block's left half: x, ln1, q / k / v, the causal attention, o and the first residual."""
    _box(ax, 0.3, 0.3, 3.6, 0.45, "x  (B, T, d_model)", PLAIN, fontsize=9)
    _box(ax, 0.9, 1.1, 2.4, 0.45, "ln1 (LayerNorm)", PLAIN, fontsize=8)
    for i, name in enumerate(("q", "k", "v")):
        linear(0.05 + i * 1.3, 2.0, name, w=1.2)
    _box(ax, 0.6, 3.05, 3.0, 0.5, "softmax(q kᵀ/√h_d) v, causal", PLAIN, fontsize=8)
    linear(1.35, 3.85, "o")
    ax.text(4.05, 4.45, "+", fontsize=16, ha="center", va="center")
    _arrow(ax, (2.1, 0.75), (2.1, 1.1))
    for i in range(3):
        _arrow(ax, (2.1, 1.55), (0.65 + i * 1.3, 2.0))
        _arrow(ax, (0.65 + i * 1.3, 2.5 + (0.12 if ("q", "k", "v")[i] in targets else 0)), (2.1, 3.05))
    _arrow(ax, (2.1, 3.55), (2.1, 3.85))
    _arrow(ax, (2.1, 4.45), (3.85, 4.45))
    ax.annotate("", xy=(4.05, 4.3), xytext=(3.9, 0.55),
                arrowprops=dict(arrowstyle="->", color="#888888", linestyle="--", connectionstyle="arc3,rad=-0.3"))
    ax.text(4.25, 2.2, "residual", fontsize=8, color="#666666", rotation=90)


def _draw_mlp_half(ax, linear, targets) -> None:
    """The block's right half: ln2, fc, GELU, proj, the second residual and the way out."""
    _box(ax, 5.0, 1.1, 2.4, 0.45, "ln2 (LayerNorm)", PLAIN, fontsize=8)
    linear(5.45, 2.0, "fc")
    _box(ax, 5.6, 3.05, 1.2, 0.45, "GELU", PLAIN, fontsize=8)
    linear(5.45, 3.85, "proj")
    ax.text(7.9, 4.45, "+", fontsize=16, ha="center", va="center")
    _arrow(ax, (4.15, 4.3), (5.0, 1.33))
    ax.annotate("", xy=(7.8, 4.6), xytext=(4.15, 4.6),
                arrowprops=dict(arrowstyle="->", color="#888888", linestyle="--", connectionstyle="arc3,rad=-0.12"))
    ax.text(6.0, 4.95, "residual", fontsize=8, color="#666666", ha="center")
    _arrow(ax, (6.2, 2.5 + (0.12 if "fc" in targets else 0)), (6.2, 3.05))
    _arrow(ax, (6.2, 3.5), (6.2, 3.85))
    _arrow(ax, (6.95, 4.45), (7.75, 4.45))
    _arrow(ax, (7.9, 4.6), (7.9, 5.15))
    ax.text(7.9, 5.25, "to the next block", fontsize=8, ha="center")


def draw_block(targets=("q", "v"), r: int = 4, d_model: int = 128):
    """One pre-norm GPT-2 block of minilora's model, its Linear layers labelled by module name.

    The layers named in ``targets`` (as in ``LoRAConfig.target_modules``) carry an adapter and are
    drawn orange with their trainable count r·(d_in + d_out); every other weight is frozen (blue).
    """
    from matplotlib.figure import Figure

    shapes = {"q": (d_model, d_model), "k": (d_model, d_model), "v": (d_model, d_model), "o": (d_model, d_model),
              "fc": (d_model, 4 * d_model), "proj": (4 * d_model, d_model)}
    fig = Figure(figsize=(8.4, 5.4))
    ax = fig.add_subplot(1, 1, 1)

    def linear(x, y, name, w=1.5):
        adapted = name in targets
        d_in, d_out = shapes[name]
        label = f"{name}  ({d_in}→{d_out})"
        if adapted:
            label += f"\n+ B A: {r * (d_in + d_out):,}"
        _box(ax, x, y, w, 0.62 if adapted else 0.5, label, TRAINED if adapted else FROZEN, fontsize=8)

    # attention half (left), MLP half (right); data flows bottom to top
    _draw_attention_half(ax, linear, targets)
    _draw_mlp_half(ax, linear, targets)
    ax.text(0.05, 5.55, f"blocks.i.attn.{{q,k,v,o}} and blocks.i.mlp.{{fc,proj}};  adapted: {', '.join(targets) or 'none'}"
                       f" (r = {r})", fontsize=9)
    ax.set_xlim(0, 8.4)
    ax.set_ylim(0, 5.8)
    ax.axis("off")
    ax.set_title("One Transformer block: LoRA adapts chosen Linear layers (orange); all else stays frozen (blue)",
                 fontsize=10)
    return fig
