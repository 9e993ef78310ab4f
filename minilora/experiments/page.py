"""docs/results.md as one page: what was run, how to remake it, the Summary, then every section."""

from __future__ import annotations

from ..methods import PAPER_NAMES
from .report import markdown_table
from .summary import findings

ORDER = ("tuning", "baselines", "lowdata", "targets", "rank", "subspace", "amplification", "latency", "variants")


def _value(v) -> str:
    return ", ".join(str(x) for x in v) if isinstance(v, list) else str(v)


def _hyperparams_table(hp: dict) -> str:
    rows = []
    for method, row in hp["methods"].items():
        own = {k: v for k, v in row.items() if k not in ("lr", "weight_decay", "steps", "length_group")}
        rows.append([PAPER_NAMES[method], f"{row['lr']:g}", f"{row['weight_decay']:g}", row["steps"],
                     row.get("length_group", 1), ", ".join(f"{k} = {_value(v)}" for k, v in own.items()) or "–"])
    text = markdown_table(["Method", "lr", "weight decay", "steps", "length group", "method's own"], rows)
    if hp["task_departures"]:
        text += "\n\nDepartures for one task: " + "; ".join(
            f"{PAPER_NAMES[d['method']]} on `{d['task']}`: "
            + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in d.items() if k not in ("method", "task"))
            for d in hp["task_departures"]) + "."
    return text


def _train_minutes(results: dict) -> float:
    """CPU-minutes of training in every run (the variants record ms per step of their common step count)."""
    variants = results["experiments"].get("variants")
    seconds = sum(run["train_seconds"] for run in results["runs"])
    if variants:
        seconds += sum(row["ms_per_step"] for row in variants["runs"]) * 1e-3 * variants["size"]["steps"]
    return seconds / 60


def _size(results: dict) -> str:
    totals = [run["total_params"] for run in results["runs"] if run["method"] == "full"]
    return f" and {totals[0]:,} parameters" if totals else ""


def _introduction(results: dict) -> list[str]:
    """The title, what the page holds, and the commands that remake it."""
    return [
        "# The paper's experiments in miniature: results",
        "",
        "This page holds Tables 1–7, Figs. 2–4, the low-data study (Table 16) and the variants that came after "
        f"the paper, run on the shipped base model (a 4-layer GPT-2 with d_model = 128{_size(results)}) "
        "over the restaurant-world tasks: `e2e` (data-to-text, like E2E NLG), `parse` (text-to-structure), "
        "`classify` (3-way inference, like MNLI) and `sql` (text to a query language, like WikiSQL). The base "
        "model's pretraining corpus holds MR strings, descriptions and questions with their answers, so it "
        "already knows much of `e2e`, `parse` and `classify`; `sql`'s query keywords never occur in it, so "
        "`sql` is a task the base has never seen. The comparisons that tell methods apart run where they can: "
        "on `sql`, with few training examples, or on the NLL.",
        "",
        "Every number on this page is rendered from `docs/results.json` by `minilora experiment report`; "
        "a test fails when the rendered page differs from this file, or when the base recorded in "
        "`results.json` is not the one shipped.",
        "",
        "## How to regenerate",
        "",
        "```bash",
        "minilora experiment all --out minilora-out/experiments   # results.json, results.md, PNGs",
        "cp minilora-out/experiments/results.json docs/results.json",
        "minilora experiment report                               # docs/results.md and docs/figures/",
        "```",
        "",
    ]


def _run_cost(results: dict) -> str:
    """How long the run took, on what machine, and its CPU-minutes of training."""
    machine = results["machine"]
    minutes = results["seconds"] / 60
    load = machine.get("load_average_start"), machine.get("load_average_end")
    return (
        f"`{results['command']}` took **{minutes:.1f} min** on this run's machine ({machine['cpus']} CPUs, "
        f"{results['workers']} worker process{'es' if results['workers'] != 1 else ''} with one BLAS thread each; load average "
        f"{load[0][0] if load[0] else '–'} at the start and {load[1][0] if load[1] else '–'} at the end). Every "
        "run seeds itself, so a second run gives the same training numbers to the last digit; only the timings "
        "(latency, seconds, ms per step) change. The training steps of the fine-tuning runs alone add up to "
        f"{_train_minutes(results):.0f} CPU-minutes (the sum of their `train_seconds`, one core each). `--fast` "
        "shrinks everything to a few steps and examples (the test suite runs it); its numbers mean nothing."
    )


def _setup(results: dict) -> list[str]:
    """The Set-up section: seeds, hyper-parameters, evaluation and how verdicts are given."""
    return [
        "## Set-up",
        "",
        f"- **Seeds.** Every comparison runs with seeds {', '.join(str(x) for x in results['seeds'])}: the seed "
        "draws the initialisation, the batch order and, in the low-data study, the training subset. A cell is "
        "the mean ± the sample standard deviation over seeds; the test split (200 examples) is the same for "
        "every seed, so the ± is the training noise, not the test sample's.",
        "- **Hyper-parameters** come from one table, `minilora.methods.HYPERPARAMS` (AdamW, batch "
        f"{results['settings']['batch_size']}, linear warm-up over the first 10 % of the steps and decay, "
        "gradient clipping 1.0); "
        "the learning rates of FT and LoRA are chosen on the val split (section below), the test split only "
        "reports:",
        "",
        _hyperparams_table(results["hyperparams"]),
        "",
        "- **Evaluation.** All 200 test examples of each task, greedy decoding with room up to the end of the "
        "context, the task's metric (higher is better; `e2e`: slot accuracy = 1 − slot error rate, and BLEU / "
        "ROUGE-L against 5 references; `parse`, `sql`: exact match; `classify`: accuracy) and the NLL, the mean "
        "negative log-likelihood of the test targets y given x (eq. 2 on held-out data, nats per token).",
        "- **Verdicts.** A claim that one setting beats another *agrees* when the means differ by more than twice "
        "the standard error of the difference in the paper's direction, *disagrees* when they do so the other "
        "way, and is *within noise* otherwise; a claim of a tie agrees when the difference is within noise, and "
        "\"matches or beats\" unless the difference goes the other way. Where both sides sit at the metric's "
        "ceiling, LoRA against full fine-tuning is judged on the NLL.",
        "",
    ]


def render_page(results: dict, sections: dict) -> str:
    """The whole page: introduction, run cost, set-up, the Summary of findings, then every section."""
    lines = _introduction(results) + [_run_cost(results), ""] + _setup(results)
    rows = findings(results["experiments"])
    if rows:
        lines += ["## Summary", "", markdown_table(["Finding of the paper", "Here (mean ± std over seeds)", "Verdict"],
                                                   rows, align=["l", "l", "l"]), ""]
    for name in ORDER:
        if name in sections:
            lines += [sections[name]]
    return "\n".join(lines).rstrip() + "\n"
