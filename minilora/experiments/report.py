"""What the experiments write: Markdown tables and files, matplotlib figures (PNG).

A ``Page`` is where one rendering goes: the folder of the Markdown, the folder of its figures
(relative to it), and what the page says about the run (fast or full, seeds, the base).
Rendering reads only the results (the dict that ``results.json`` holds), never a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Page", "markdown_table", "new_figure", "nll", "write_figure", "write_markdown"]


@dataclass
class Page:
    out_dir: str  # where the Markdown goes
    figure_dir: str = ""  # figures, relative to out_dir ("" = beside the Markdown)
    fast: bool = False
    n_seeds: int = 1
    settings_text: str = ""
    base_note: str = ""

    def figure_path(self, name: str) -> str:
        folder = os.path.join(self.out_dir, self.figure_dir)
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, name)

    def figure_link(self, name: str) -> str:
        return f"{self.figure_dir}/{name}" if self.figure_dir else name


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


def section(page: Page, title: str, body: str, figures=()) -> str:
    """One experiment's section: its title, its body, its figures and how it was made."""
    lines = [f"## {title}", "", body.strip(), ""]
    for fig in figures:
        lines += [f"![{fig}]({page.figure_link(fig)})", ""]
    lines += [f"_Settings: {'--fast, ' if page.fast else ''}{page.settings_text}; base: {page.base_note}._", ""]
    return "\n".join(lines)


def write_markdown(page: Page, name: str, text: str) -> str:
    """Write ``<name>.md`` into ``page.out_dir``; return the text."""
    os.makedirs(page.out_dir, exist_ok=True)
    with open(os.path.join(page.out_dir, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def new_figure(width=6.4, height=4.0, **kwargs):
    """A matplotlib Figure without pyplot (no global state, no GUI backend: it renders with Agg)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), **kwargs)


def write_figure(page: Page, fig, name: str, tight: bool = True) -> str:
    """Save ``fig`` as ``name`` in the page's figure folder (110 dpi) and return ``name``."""
    if tight:
        fig.tight_layout()
    fig.savefig(page.figure_path(name), dpi=110, metadata={"Software": None})
    return name
