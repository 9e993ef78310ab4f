"""Spread over seeds and the verdicts that follow from it.

Every comparison of ``docs/results.md`` is repeated over the seeds of the settings. A cell is the
mean ± the sample standard deviation over seeds (``spread``). Two methods are told apart when
their means differ by more than twice the standard error of the difference (``verdict``); else
they are "within noise". With three seeds that is a rough test: it guards against reading one
lucky seed as a finding, which a single run cannot.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["compare", "format_spread", "spread"]


def spread(values) -> dict:
    """{"mean", "std", "n", "values"} of a list of numbers (std: sample std, ddof = 1; 0 for one value)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("spread of no values")
    std = float(np.std(values, ddof=1)) if n > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "n": n, "values": values}


def compare(a: dict, b: dict, higher_is_better: bool = True, z: float = 2.0) -> dict:
    """Is ``a`` better than ``b``? Both are ``spread``s. Returns {"diff", "se", "verdict"}.

    ``verdict``: "better" or "worse" when |mean_a − mean_b| > z · se with
    se = sqrt(std_a²/n_a + std_b²/n_b); "tie" when the two are equal on every seed (deterministic
    runs that agree); else "within noise".
    """
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    if se == 0.0 and diff == 0.0:
        verdict = "tie"
    elif abs(diff) > z * se:
        verdict = "better" if (diff > 0) == higher_is_better else "worse"
    else:
        verdict = "within noise"
    return {"diff": diff, "se": se, "verdict": verdict}


def format_spread(s: dict, digits: int = 3) -> str:
    """"0.812 ± 0.021" (the ± is the std over seeds); one seed prints the bare value."""
    if not math.isfinite(s["mean"]):
        return "–"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
