"""The tutorials run end to end in fast mode, as scripts and as notebooks, and show their figures.

Each tutorial is a jupytext percent-format script (``tutorials/NN_name.py``). Here every one runs
in a subprocess with ``MINILORA_FAST=1`` (a few training steps, a few eval examples), matplotlib's
Agg backend, one BLAS thread (the machines are shared), and ``MINILORA_OUT`` pointing at a
temporary folder; the test then checks each promised PNG exists, is non-empty and is a PNG.
The exercises' stubs must report "not attempted yet"; the solutions are not in the tutorials.

Every tutorial also runs as a notebook in an IPython kernel (nbclient, as the course site
builds it): no cell raises, each promised figure is shown below its cell, nothing is written to
stderr (no TqdmWarning, no other warning), and the stored outputs stay small.
"""

import base64
import glob
import json
import os
import re
import subprocess
import sys

import pytest
from sitebuild import FAST_ENV, fast_site, require_docs_extra  # noqa: F401  (fast_site is a fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = os.path.join(REPO, "tutorials")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# tutorial -> the figures it promises (in MINILORA_OUT)
FIGURES = {
    "01_autograd.py": ["01_finite_difference_error.png"],
    "02_lora_layer.py": ["02_reparametrisation.png", "02_update_scale.png"],
    "03_tiny_transformer.py": ["03_block.png", "03_block_lora.png", "03_loss_mask.png"],
    "04_finetune.py": ["04_full_vs_lora.png"],
    "05_merge_and_serve.py": ["05_merge.png", "05_latency.png"],
    "06_what_rank.py": ["06_rank_sweep.png", "06_subspace.png"],
    "07_gpu.py": ["07_step_time.png"],
    "08_to_peft.py": ["08_peft_analysis.png"],
    "09_after_the_paper.py": ["09_spectrum.png", "09_race.png", "09_nf4.png"],
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
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}  # this checkout's minilora
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
    assert stubs >= 1, f"{name}: no exercise stub reported 'not attempted yet':\n{proc.stdout[-2000:]}"
    assert "✓ " not in proc.stdout, f"{name}: a check passed, so a solution sits in the tutorial:\n{proc.stdout[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_tutorial_runs_as_a_notebook(name, fast_site):  # noqa: F811 (the fixture imported above)
    """Executed by nbclient in an IPython kernel (the course site's fast-mode build, tests/sitebuild.py)."""
    import nbformat

    notebook = nbformat.read(os.path.join(fast_site["notebooks"], name[:-3] + ".ipynb"), as_version=4)
    images, stderr, errors, text, echoed = [], [], [], [], []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "execute_result":  # a cell's last expression, echoed below it
                echoed.append(output.data.get("text/plain", "")[:200])
            if output.output_type == "error":
                errors.append(f"{output.ename}: {output.evalue}")
            elif output.output_type == "stream":
                (stderr if output.name == "stderr" else text).append(output.text)
            elif "image/png" in output.get("data", {}):
                images.append(base64.b64decode(output.data["image/png"]))
    assert not errors, f"{name} as a notebook: {errors}"
    # what a tutorial shows, it prints: no `False` of an exercise check, no path of a figure, no repr
    assert not echoed, f"{name}: cells echo their last value: {echoed}"
    assert "minilora-site-" not in "".join(text), f"{name} prints the build's temporary folder"
    # nothing of ours on stderr (no TqdmWarning, no warning from minilora); a third-party library's
    # own deprecation notice (e.g. transformers in tutorial 08) is not the tutorial's to fix
    ours = [line for line in "".join(stderr).splitlines()
            if line.strip() and not re.search(r"site-packages/(?!tqdm)[^/]+/.*Warning:", line)
            and not line.startswith("  ")]
    assert not ours, f"{name} as a notebook wrote to stderr:\n{''.join(stderr)[:2000]}"
    assert len(images) >= len(FIGURES[name]), f"{name}: {len(images)} figures shown, {len(FIGURES[name])} promised"
    for png in images:
        assert png[:8] == PNG_MAGIC and len(png) > 1000
    size = len(json.dumps([c.get("outputs", []) for c in notebook.cells if c.cell_type == "code"]))
    assert size - sum(len(base64.b64encode(p)) for p in images) < 60_000, f"{name}: {size} bytes of text outputs"
    assert "not attempted yet" in "".join(text) and "✓ " not in "".join(text)


def test_progress_bar_in_a_notebook_is_quiet():
    """fit(progress=True) in a kernel: a widget where ipywidgets is installed, else no bar; never a TqdmWarning."""
    require_docs_extra()
    import nbclient
    import nbformat

    source = ("import numpy as np\nimport minilora as ml\nfrom minilora import nn, optim\nfrom minilora.train import fit\n"
              "ml.manual_seed(0)\nlayer = nn.Linear(4, 3)\nopt = optim.AdamW(layer.parameters(), lr=1e-2)\n"
              "x = ml.tensor(np.ones((2, 4), dtype=np.float32))\n"
              "class M(nn.Module):\n"
              "    def __init__(self):\n        super().__init__()\n        self.layer = layer\n"
              "    def loss(self, idx, targets, mask=None):\n        y = self.layer(x)\n        return (y * y).mean()\n"
              "fit(M(), opt, lambda step: (None, None, None), steps=40, progress=True)\nprint('done')")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    env = {**os.environ, **FAST_ENV, "PYTHONPATH": REPO}
    env.pop("TQDM_DISABLE", None)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": REPO}}).execute(env=env)
    outputs = notebook.cells[0].outputs
    stderr = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stderr")
    assert "TqdmWarning" not in stderr and not stderr.strip(), stderr[:2000]
    assert any("done" in o.get("text", "") for o in outputs if o.output_type == "stream")
    assert len(json.dumps(outputs)) < 5_000, f"{len(json.dumps(outputs))} bytes of outputs for one progress bar"
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        assert not widgets  # no ipywidgets: no bar at all
    else:
        assert len(widgets) == 1, outputs  # the notebook extra: one tqdm widget, updated in place
