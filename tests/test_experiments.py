"""`minilora experiment NAME --fast`: every experiment writes results.json, its Markdown table and its PNGs.

The whole `all --fast` runs once, through the command line, in a subprocess with one BLAS thread
(on a shared 2-core machine OpenBLAS's threads fight each other and tiny matmuls get ~10x slower).
The committed `docs/results.json` must come from the shipped base and render to the committed
`docs/results.md`.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from minilora import __version__
from minilora.experiments import EXPERIMENTS, read_results, render_report, render_results, run_experiment
from minilora.experiments.stats import compare, format_spread, spread
from minilora.methods import hyperparams
from minilora.models import GPT, GPTConfig
from minilora.models.pretrained import BASE_WEIGHTS, base_sha256, file_sha256

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
    text = (fast_all / "results.md").read_text(encoding="utf-8")
    for title in ("Baselines", "Which weight matrices", "The rank r", "Subspace similarity", "pre-trained weight",
                  "latency", "Low-data regime", "Choosing the learning rates", "Beyond the paper", "## Summary"):
        assert title in text
    assert "took" in text


def test_results_json_holds_every_run_the_settings_and_the_base(fast_all):
    results = json.loads((fast_all / "results.json").read_text(encoding="utf-8"))
    assert results["version"] == __version__ and results["fast"] is True
    assert results["base_sha256"] == file_sha256(BASE_WEIGHTS) == base_sha256()
    assert results["seeds"] == [0, 1] and set(results["experiments"]) == set(EXPERIMENTS)
    runs = results["runs"]
    assert {r["seed"] for r in runs if r["method"] != "base"} == {0, 1}
    assert {(r["task"], r["method"]) for r in runs} >= {(t, m) for t in ("e2e", "parse", "classify", "sql")
                                                        for m in ("base", "full", "lora")}
    e2e = [r for r in runs if r["task"] == "e2e"]
    assert all({"bleu", "rouge_l"} <= set(r) for r in e2e)  # data-to-text's text metrics
    low = [r for r in runs if r["n_train"] is not None]
    assert low and all(r["eval_split"] == "test" for r in low)
    assert any(r["eval_split"] == "val" for r in runs)  # the tuning runs
    cell = results["experiments"]["baselines"]["cells"]["lora"]["sql"]["metric"]
    assert cell["n"] == 2 and len(cell["values"]) == 2


def test_the_page_renders_from_results_json_alone(fast_all, tmp_path):
    """Rendering the written results.json again gives the same page, without a model or a run."""
    render_results(read_results(fast_all / "results.json"), tmp_path, figure_dir="", per_experiment=True)
    assert (tmp_path / "results.md").read_text(encoding="utf-8") == (fast_all / "results.md").read_text(encoding="utf-8")
    for name in EXPERIMENTS:
        assert (tmp_path / f"{name}.md").read_text(encoding="utf-8") == (fast_all / f"{name}.md").read_text(encoding="utf-8")


def test_experiment_report_renders_a_results_file(fast_all, tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "minilora.cli", "experiment", "report", "--results",
                           str(fast_all / "results.json"), "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "results.md").read_text(encoding="utf-8")
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert figures and all(f.startswith("figures/") and _is_png(tmp_path / f) for f in figures)
    missing = subprocess.run([sys.executable, "-m", "minilora.cli", "experiment", "report", "--results",
                              str(tmp_path / "nope.json")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no results file" in missing.stderr


# --- the committed artifact ------------------------------------------------------------------

DOCS = os.path.join(REPO, "docs")


def _committed() -> dict:
    return read_results(os.path.join(DOCS, "results.json"))


def test_committed_results_come_from_the_shipped_base():
    results = _committed()
    assert results["fast"] is False and len(results["seeds"]) >= 3
    assert results["base_sha256"] == file_sha256(BASE_WEIGHTS), (
        "docs/results.json was made with another base model: rerun `minilora experiment all` and "
        "`minilora experiment report` (docs/results.md, How to regenerate)")
    assert results["version"] == __version__


def test_committed_page_is_rendered_from_the_committed_results(tmp_path):
    page = render_report(os.path.join(DOCS, "results.json"), tmp_path)
    with open(os.path.join(DOCS, "results.md"), encoding="utf-8") as f:
        assert page == f.read(), "docs/results.md differs from its rendering: run `minilora experiment report`"
    for figure in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", page):
        assert _is_png(os.path.join(DOCS, figure)), f"docs/{figure} is missing"


def test_the_hyperparameter_table_holds_the_learning_rates_chosen_on_val():
    tuning = _committed()["experiments"]["tuning"]
    for task, by_method in tuning["chosen"].items():
        for method, lr in by_method.items():
            assert hyperparams(method, task)["lr"] == lr, (
                f"{method} on {task}: docs/results.json chose lr {lr:g} on the val split, "
                f"methods.hyperparams trains with {hyperparams(method, task)['lr']:g}")


# --- verdicts --------------------------------------------------------------------------------

def test_verdicts_follow_the_spread_over_seeds():
    a, b = spread([0.80, 0.82, 0.81]), spread([0.70, 0.71, 0.69])
    assert compare(a, b)["verdict"] == "better" and compare(b, a)["verdict"] == "worse"
    assert compare(a, b, higher_is_better=False)["verdict"] == "worse"
    noisy = spread([0.60, 0.95, 0.75])
    assert compare(noisy, b)["verdict"] == "within noise"
    same = spread([1.0, 1.0, 1.0])
    assert compare(same, same)["verdict"] == "tie"
    assert spread([2.0])["std"] == 0.0 and spread([1.0, 3.0])["std"] == pytest.approx(2 ** 0.5)
    assert format_spread(a) == "0.810 ± 0.010" and format_spread(spread([0.5])) == "0.500"
    with pytest.raises(ValueError, match="no values"):
        spread([])


def test_baselines_table_has_every_method_and_task(fast_all):
    text = (fast_all / "baselines.md").read_text(encoding="utf-8")
    for name in ("FT", "FT^Top2", "BitFit", "Adapter^H", "Adapter^L", "PreEmbed", "LoRA", "e2e", "parse", "classify"):
        assert name in text


def test_run_experiment_in_process_returns_its_results(tmp_path):
    small = GPT(GPTConfig(vocab_size=96, block_size=64, n_layer=1, n_head=2, d_model=16))
    result = run_experiment("latency", out_dir=tmp_path, fast=True, progress=False, base=small)
    cells = result["latency"]["results"]["cells"]
    assert cells and all(isinstance(o["mean"], float) and len(o["values"]) == 2
                         for c in cells.values() for o in c["overhead"].values())
    assert _is_png(tmp_path / "latency.png")
    assert result["results"]["base_sha256"] is None  # a model passed in has no shipped file


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


@pytest.mark.slow
def test_a_committed_run_reproduces_to_the_last_digit():
    """The committed numbers are this code's: a run of docs/results.json trained again ends at the same
    training loss to the last digit, and the base model scored again gives the same metric, NLL, BLEU
    and ROUGE-L (every run seeds itself)."""
    from minilora.recipes import finetune, zero_shot

    runs = _committed()["runs"]

    def committed(task, method):
        return next(r for r in runs if (r["task"], r["method"], r["seed"], r["n_train"], r["eval_split"])
                    == (task, method, 0, None, "test"))

    run = committed("parse", "lora")
    hp = {k: tuple(v) if isinstance(v, list) else v for k, v in run["hp"].items()}
    again = finetune("parse", "lora", seed=0, n_eval=1, progress=False, measure_memory=False, **hp)
    assert float(np.mean(again.history.losses[-10:])) == run["final_loss"]
    base, scored = committed("e2e", "base"), zero_shot("e2e")
    assert (scored.metric, scored.eval_loss) == (base["metric"], base["eval_loss"])
    assert scored.text_scores == {"bleu": base["bleu"], "rouge_l": base["rouge_l"]}
