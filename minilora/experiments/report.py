"""What the experiments write: Markdown tables and files, matplotlib figures (PNG)."""

from __future__ import annotations

import numpy as np

__all__ = ["markdown_table", "new_figure", "nll", "write_figure", "write_markdown"]


def _cell(value) -> str:
    if isinstance(value, float):
        if not np.isfinite(value):
            return "–"
        return f"{value:.3g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def nll(value: float) -> str:
    """NLL values differ in the 3rd-4th digit between methods: print 4 decimals."""
    return f"{value:.4f}" if np.isfinite(value) else "–"


def markdown_table(header, rows, align=None) -> str:
    """A GitHub Markdown table; floats are printed with 3 decimals (or 3 significant digits)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(ctx, name: str, title: str, body: str, figures=()) -> str:
    """Write ``<name>.md`` into ``ctx.out_dir`` (title, the body, the figures, how it was made); return its text."""
    s = ctx.settings
    lines = [f"## {title}", "", body.strip(), ""]
    for fig in figures:
        lines += [f"![{fig}]({fig})", ""]
    lines += [f"_Settings: {'--fast, ' if ctx.fast else ''}{s.describe()}; base: {ctx.base_note}._", ""]
    text = "\n".join(lines)
    with open(ctx.path(f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def new_figure(width=6.4, height=4.0, **kwargs):
    """A matplotlib Figure without pyplot (no global state, no GUI backend: it renders with Agg)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), **kwargs)


def write_figure(ctx, fig, name: str, tight: bool = True) -> str:
    """Save ``fig`` as ``<ctx.out_dir>/<name>`` (110 dpi) and return ``name`` (for the Markdown link)."""
    if tight:
        fig.tight_layout()
    fig.savefig(ctx.path(name), dpi=110)
    return name
