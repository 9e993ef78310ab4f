"""`minilora experiment NAME --fast`: every experiment writes its Markdown table and its PNGs.

The whole `all --fast` runs once, through the command line, in a subprocess with one BLAS thread
(on a shared 2-core machine OpenBLAS's threads fight each other and tiny matmuls get ~10x slower).
"""

import os
import re
import subprocess
import sys

import pytest

from minilora.experiments import EXPERIMENTS, run_experiment
from minilora.models import GPT, GPTConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fast_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "minilora.cli", "experiment", "all", "--fast", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG_MAGIC and os.path.getsize(path) > 1000


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_experiment_writes_a_table_and_pngs(fast_all, name):
    text = (fast_all / f"{name}.md").read_text(encoding="utf-8")
    assert re.search(r"^\|.*\|\n\|[-:|]+\|\n\|", text, re.MULTILINE), f"{name}.md holds no Markdown table"
    assert "--fast" in text
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert figures, f"{name}.md links no figure"
    for fig in figures:
        assert _is_png(fast_all / fig), f"{fig} is missing or not a PNG"


@pytest.mark.slow
def test_all_collects_every_table(fast_all):
    text = (fast_all / "all.md").read_text(encoding="utf-8")
    for title in ("Baselines", "Which weight matrices", "The rank r", "Subspace similarity", "pre-trained weight",
                  "latency"):
        assert title in text
    assert "took" in text


def test_baselines_table_has_every_method_and_task(fast_all):
    text = (fast_all / "baselines.md").read_text(encoding="utf-8")
    for name in ("FT", "FT^Top2", "BitFit", "Adapter^H", "Adapter^L", "PreEmbed", "LoRA", "e2e", "parse", "classify"):
        assert name in text


def test_run_experiment_in_process_returns_its_results(tmp_path):
    small = GPT(GPTConfig(vocab_size=96, block_size=64, n_layer=1, n_head=2, d_model=16))
    result = run_experiment("latency", out_dir=tmp_path, fast=True, progress=False, base=small)
    cells = result["latency"]["results"]
    assert cells and all(isinstance(v, float) for v in cells.values())
    assert _is_png(tmp_path / "latency.png")


def test_unknown_experiment_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment 'tables'"):
        run_experiment("tables", out_dir=tmp_path, fast=True)


def test_runs_with_the_same_settings_share_one_cache_key(tmp_path):
    """The LoRA baseline (HYPERPARAMS: r = 4 on q, v, alpha = 2r) is the q+v, r = 4, alpha = 8 cell of Tables 5/6."""
    from minilora.experiments import Context
    from minilora.experiments.settings import LORA_ALPHA

    ctx = Context(tmp_path, fast=True, progress=False, base=GPT(GPTConfig(n_layer=1, n_head=2, d_model=16)))
    baseline = ctx.key("parse", "lora", 0, {})
    assert baseline == ctx.key("parse", "lora", 0, {"r": 4, "alpha": LORA_ALPHA, "targets": ("q", "v")})
    assert baseline != ctx.key("parse", "lora", 0, {"r": 8, "alpha": LORA_ALPHA, "targets": ("q", "v")})
    assert baseline != ctx.key("parse", "lora", 1, {})
