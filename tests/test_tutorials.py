"""The tutorials run end to end as scripts in fast mode and write the figures they promise.

Each tutorial is a jupytext percent-format script (``tutorials/NN_name.py``). Here every one runs
in a subprocess with ``MINILORA_FAST=1`` (a few training steps, a few eval examples), matplotlib's
Agg backend, one BLAS thread (the machines are shared), and ``MINILORA_OUT`` pointing at a
temporary folder; the test then checks each promised PNG exists, is non-empty and is a PNG.
The exercises' stubs must report "not attempted yet" and the solutions must pass their checks.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = os.path.join(REPO, "tutorials")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# tutorial -> the figures it promises (in MINILORA_OUT)
FIGURES = {
    "01_autograd.py": ["01_finite_difference_error.png"],
    "02_lora_layer.py": ["02_update_scale.png"],
    "03_tiny_transformer.py": ["03_loss_mask.png"],
    "04_finetune.py": ["04_full_vs_lora.png"],
    "05_merge_and_serve.py": ["05_latency.png"],
    "06_what_rank.py": ["06_rank_sweep.png", "06_subspace.png"],
    "07_gpu.py": ["07_step_time.png"],
}


def test_every_tutorial_is_listed():
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(TUTORIALS, "[0-9][0-9]_*.py")))
    assert found == sorted(FIGURES), "a tutorial was added or renamed: list its figures in FIGURES"
    with open(os.path.join(TUTORIALS, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for name in FIGURES:
        assert name in readme, f"tutorials/README.md does not mention {name}"


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_tutorial_is_a_percent_format_notebook(name):
    with open(os.path.join(TUTORIALS, name), encoding="utf-8") as f:
        text = f.read()
    assert "# %% [markdown]" in text and re.search(r"^# %%$", text, re.MULTILINE), "needs code and markdown cells"
    assert "import minilora" in text
    assert "## Exercises" in text and "## Solutions" in text
    jupytext = pytest.importorskip("jupytext")
    notebook = jupytext.reads(text, fmt="py:percent")
    kinds = {cell.cell_type for cell in notebook.cells}
    assert kinds == {"code", "markdown"}
    assert len(notebook.cells) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_tutorial_runs_in_fast_mode_and_writes_its_figures(name, tmp_path):
    env = {**os.environ, "MINILORA_FAST": "1", "MPLBACKEND": "Agg", "MINILORA_OUT": str(tmp_path),
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MINILORA_BACKEND": "",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # this checkout's minilora
    proc = subprocess.run([sys.executable, os.path.join(TUTORIALS, name)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for figure in FIGURES[name]:
        path = tmp_path / figure
        assert path.exists(), f"{name} promised {figure} but did not write it (wrote {os.listdir(tmp_path)})"
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC, f"{figure} is not a PNG"
        assert path.stat().st_size > 1000, f"{figure} is (nearly) empty"
    stubs = proc.stdout.count("not attempted yet")
    passes = proc.stdout.count("✓ ")
    assert stubs >= 1 and passes == stubs, (
        f"{name}: {stubs} exercise stubs but {passes} passing solution checks:\n{proc.stdout[-2000:]}")
