"""What ``minilora analyze`` prints and draws from a report of ``hf.analyze`` (or of the GPT-2 path).

    print_report(report)                       # the table per matrix, then the means by kind and by depth
    write_figure(report, "out/analyze.png")    # spectra by depth, amplification, φ grids; None without matplotlib
"""

from __future__ import annotations

import math
import os

import numpy as np

from .analyze import module_order

__all__ = ["print_report", "write_figure"]


def _number(x, fmt, width):
    """``x`` formatted, or a dash for a figure that is not there (None, NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return f"{'-':>{width}}"
    return format(x, f">{width}{fmt}")


def print_report(report: dict) -> None:
    """The table per matrix (layer by layer, kind by kind), then the means by kind and by depth."""
    rows = report["rows"]
    with_phi = report["against"] is not None
    where = report["base"]
    print(f"{report['kind']} adapter {report['adapter']}: {len(rows)} adapted matrices"
          + (f"; base weights from {where}" if where else "; no base weights (pass --base) for the amplification"))
    for note in report.get("notes", []):
        print(f"  note: {note}")
    width = max([22] + [len(r["matrix"]) for r in rows])
    header = (f"{'matrix':<{width}} {'shape':>12} {'r':>3} {'scaling':>8} {'‖ΔW‖_F':>9}  {'σ_1 .. σ_r of ΔW':<34} "
              f"{'top-1':>6} {'k90':>4} {'amplif.':>8}")
    header += f" {'φ(1,1)':>7} {'φ(r,r′)':>7}" if with_phi else ""
    print(header)
    for row in rows:
        sv = " ".join(f"{x:.3g}" for x in row["singular_values"][:5]) + (" …" if len(row["singular_values"]) > 5 else "")
        share = row["energy_share"][0] if row["energy_share"] else None
        line = (f"{row['matrix']:<{width}} {str(tuple(row['shape'])):>12} {row['r']:>3} {row['scaling']:8.4g} "
                f"{row['norm_delta_W']:9.4f}  {sv:<34} {_number(share, '.3f', 6)} {_number(row['rank_90'], 'd', 4)} "
                f"{_number(row.get('amplification'), '.2f', 8)}")
        if with_phi:
            line += f" {_number(row.get('phi_1_1'), '.3f', 7)} {_number(row.get('phi_r_r'), '.3f', 7)}"
        print(line)
        if "magnitude" in row:
            m = row["magnitude"]
            extra = (f"; m / ‖W0 + s·B·A‖_row {m['ratio_to_row_norm']['min']:.4f} .. {m['ratio_to_row_norm']['max']:.4f}, "
                     f"‖W′ − W0‖_F {row['norm_weight_change']:.4f}" if "ratio_to_row_norm" in m else "")
            print(f"{'':<{width}}   DoRA magnitude m: ‖m‖ {m['norm']:.4f}, {m['min']:.4g} .. {m['max']:.4g}{extra}")
    for by, title in (("kind", "by module kind"), ("layer", "by depth (layer)")):
        print(f"means {title}:")
        print(f"  {by:<{max(18, width // 2)}} {'n':>3} {'‖ΔW‖_F':>9} {'top-1':>6} {'k90':>5} {'amplif.':>8}"
              + (f" {'φ(1,1)':>7}" if with_phi else ""))
        for g in report["summary"][f"by_{by}"]:
            key = "-" if g[by] is None else str(g[by])
            print(f"  {key:<{max(18, width // 2)}} {g['matrices']:>3} {_number(g['norm_delta_W'], '.4f', 9)} "
                  f"{_number(g['top1_share'], '.3f', 6)} {_number(g['rank_90'], '.1f', 5)} "
                  f"{_number(g['amplification'], '.2f', 8)}" + (f" {_number(g['phi_1_1'], '.3f', 7)}" if with_phi else ""))


def write_figure(report: dict, path: str) -> str | None:
    """The report's PNG: spectra and top-direction shares by depth, amplification by depth (with a base),
    and the φ grids of Figs. 3 / 4 (with ``against``). None, and no file, when matplotlib is missing."""
    return _figure(report, path)


def _kinds(rows) -> list:
    return sorted({r["kind"] for r in rows}, key=lambda k: module_order(f"x.0.{k}"))


def _by_layer(rows, kind, value):
    pts = [(r["layer"], value(r)) for r in rows if r["kind"] == kind and r["layer"] is not None and value(r) is not None]
    return zip(*sorted(pts)) if pts else ((), ())


def _figure(report: dict, path: str):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = report["rows"]
    kinds = _kinds(rows)
    with_amp = any(np.isfinite(r.get("amplification", np.nan)) for r in rows)
    phi_rows = []  # Figs. 3 / 4: one grid per kind, at the middle depth
    for kind in kinds[:4]:
        cands = [r for r in rows if r["kind"] == kind and "phi_grid" in r]
        if cands:
            phi_rows.append(cands[len(cands) // 2])
    panels = 2 + with_amp + len(phi_rows)
    fig = Figure(figsize=(3.9 * panels, 3.4), layout="constrained")
    _spectra_panel(fig.add_subplot(1, panels, 1), rows)
    _by_layer_panel(fig.add_subplot(1, panels, 2), rows, kinds, lambda r: r["energy_share"][0] if r["energy_share"] else None,
                    "share of ‖ΔW‖² in σ_1", "top direction's share by depth", ylim=(0, 1.05))
    n = 3
    if with_amp:
        _by_layer_panel(fig.add_subplot(1, panels, n), rows, kinds,
                        lambda r: r.get("amplification") if np.isfinite(r.get("amplification", np.nan)) else None,
                        "‖ΔW‖_F / ‖UᵀW0Vᵀ‖_F", "amplification by depth (Table 7)")
        n += 1
    for row in phi_rows:
        _phi_panel(fig, fig.add_subplot(1, panels, n), row, report)
        n += 1
    fig.savefig(path, dpi=110)
    return path


def _spectra_panel(ax, rows) -> None:
    """σ_i / σ_1 of every matrix's ΔW, coloured by depth."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    layers = [r["layer"] for r in rows if r["layer"] is not None]
    depth = colormaps["viridis"]
    top = max(layers) if layers else 0
    for row in rows:
        sv = np.asarray(row["singular_values"])
        if sv.size and sv[0] > 0:
            shade = depth(row["layer"] / top) if row["layer"] is not None and top else depth(0.5)
            ax.plot(np.arange(1, sv.size + 1), sv / sv[0], marker=".", color=shade, alpha=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("i")
    ax.set_ylabel("σ_i / σ_1 of ΔW")
    ax.set_title("spectra (colour: depth, dark = first layer)", fontsize=9)


def _by_layer_panel(ax, rows, kinds, value, ylabel: str, title: str, ylim=None) -> None:
    """One line per module kind: ``value(row)`` against the layer."""
    from matplotlib.ticker import MaxNLocator

    for kind in kinds:
        x, y = _by_layer(rows, kind, value)
        ax.plot(x, y, marker="o", label=kind)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)


def _phi_panel(fig, ax, row, report) -> None:
    """The φ(i, j) grid of one matrix against the other adapter's (Figs. 3 / 4)."""
    from matplotlib.ticker import MaxNLocator

    grid = np.asarray(row["phi_grid"])
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                      extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
    fig.colorbar(image, ax=ax, shrink=0.85)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"j ({os.path.basename(os.path.normpath(report['against']))})", fontsize=8)
    ax.set_ylabel(f"i ({os.path.basename(os.path.normpath(report['adapter']))})", fontsize=8)
    ax.set_title(f"φ(i, j), {row['kind']}, layer {row['layer']} (Sec. 7.2)", fontsize=9)
