"""The command line: every command is listed, and the main job runs end to end (fast mode)."""

import json
import os
import subprocess
import sys

import pytest

from minilora.cli import build_parser

COMMANDS = ("demo", "pretrain", "finetune", "generate", "experiment", "bench", "export", "import-peft", "analyze")


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "minilora.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in COMMANDS:
        assert command in out


def test_unknown_task_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--task", "mnli"])


@pytest.mark.slow
def test_demo_fast_runs_end_to_end(tmp_path):
    """`minilora demo --fast`: the table, merged == unmerged, adapter files, the mixed batch, the PNG, the JSON."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "minilora.cli", "demo", "--fast", "--out", str(out), "--json", str(tmp_path / "demo.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed batch == one adapter at a time: True" in result.stdout
    # progress without a TTY (a pipe here): a few plain lines per run, never a redrawn bar
    progress = [line for line in result.stderr.splitlines() if "/full: step" in line or "/lora: step" in line]
    assert 6 <= len(progress) <= 6 * 4 and "\r" not in result.stderr
    results = json.loads((tmp_path / "demo.json").read_text())
    assert results["mixed_batch_matches_separate"] is True
    from minilora.data import load_task

    for task, shown in results["mixed_batch"].items():  # the showcase: the FIRST test example of each task
        first = load_task(task, "test", 1)[0]
        assert shown["prompt"] == first.prompt and shown["reference"] == first.target
        assert isinstance(shown["correct"], bool) and isinstance(shown["answer"], str)
        assert f"reference: {first.target}" in result.stdout
    assert result.stdout.count("✓") + result.stdout.count("✗") == 3
    assert set(results["tasks"]) == {"e2e", "parse", "classify"}  # the demo's tasks (sql is the experiments')
    for task in ("e2e", "parse", "classify"):
        cells = results["tasks"][task]
        base = cells["base"]  # the shipped model with no fine-tuning, scored like the others
        assert base["trainable_params"] == 0 and base["train_seconds"] == 0.0 and 0.0 <= base["metric"] <= 1.0
        assert f"{task:<9}base " in result.stdout
        for method in ("full", "lora"):
            cell = cells[method]
            assert set(cell) >= {"trainable_params", "total_params", "metric_name", "metric", "train_seconds",
                                 "optimizer_state_bytes"}
            assert 0.0 <= cell["metric"] <= 1.0
        # LoRA trains ~1 % of the weights, and its AdamW state is 2 floats per trainable weight
        assert cells["lora"]["trainable_params"] <= 0.02 * cells["full"]["trainable_params"]
        assert cells["lora"]["optimizer_state_bytes"] == 2 * 4 * cells["lora"]["trainable_params"]
        assert results["merge"][task]["max_abs_logit_diff"] < 1e-4
        assert (out / f"{task}.safetensors").stat().st_size < results["full_checkpoint_bytes"] / 20
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_bad_input_is_a_clean_error_not_a_traceback():
    result = subprocess.run([sys.executable, "-m", "minilora.cli", "generate", "name[the eagle] food[frenchh]"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown word 'frenchh'" in result.stderr and "close words: 'french'" in result.stderr
    assert "Traceback" not in result.stderr


def test_finetune_joint_trains_three_adapters_from_the_command_line(tmp_path):
    env = {**os.environ, "MINILORA_FAST": "1"}  # 40 test examples per task
    result = subprocess.run(
        [sys.executable, "-m", "minilora.cli", "finetune", "--task", "e2e,parse,classify", "--method", "lora",
         "--joint", "--steps", "3", "--batch-size", "2", "--no-progress", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for task in ("e2e", "parse", "classify"):
        assert f"{task}/lora (joint):" in result.stdout
        assert (tmp_path / f"{task}.safetensors").stat().st_size > 0
    assert "trained 3 adapters in one mixed batch" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--task", "e2e,parse", "--method", "full", "--joint"], "--joint trains one LoRA adapter per task"),
    (["--task", "e2e,parse"], "several tasks need --joint"),
])
def test_finetune_joint_misuse_is_a_clean_error(argv, message):
    result = subprocess.run([sys.executable, "-m", "minilora.cli", "finetune", *argv], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_every_import_the_commands_need_is_a_dependency_of_a_plain_install():
    """A plain ``pip install .`` runs every command: an import not guarded by ``except ImportError`` is a
    dependency (cupy and tokenizers belong to the commands' own extras, gpu and hf)."""
    import ast
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {d.split(">")[0].split("=")[0].split("[")[0].strip().replace("-", "_") for d in project["dependencies"]}
    extras = {"cupy": "gpu", "cupyx": "gpu", "tokenizers": "hf"}
    needed = {}
    for path in (root / "minilora").rglob("*.py"):
        tree = ast.parse(path.read_text())
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                   and any("ImportError" in ast.dump(h.type) for h in t.handlers if h.type is not None)
                   for stmt in t.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            for name in names:
                if name not in sys.stdlib_module_names and name != "minilora":
                    needed.setdefault(name, path.relative_to(root).as_posix())
    assert "numpy" in needed and "matplotlib" in needed
    missing = {n: where for n, where in needed.items() if n not in declared and n not in extras}
    assert not missing, f"imported without a guard but not in [project] dependencies: {missing}"
    for name, extra in extras.items():
        if name in needed and name != "cupyx":
            assert any(d.startswith(name) for d in project["optional-dependencies"][extra]), (name, extra)


def test_readme_measured_section_is_rendered_from_the_committed_demo_json():
    """README's demo table and showcase are `demo.readme_section(docs/demo.json)`, from the shipped base."""
    from minilora.demo import readme_section
    from minilora.models.pretrained import BASE_WEIGHTS, file_sha256

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = json.loads(open(os.path.join(repo, "docs", "demo.json"), encoding="utf-8").read())
    assert results["fast"] is False and results["base_sha256"] == file_sha256(BASE_WEIGHTS), (
        "docs/demo.json was made with another base: `minilora demo --json docs/demo.json`, then paste "
        "demo.readme_section into README")
    readme = open(os.path.join(repo, "README.md"), encoding="utf-8").read()
    begin, end = "<!-- begin: demo.readme_section(docs/demo.json) -->\n", "\n<!-- end: demo.readme_section -->"
    assert begin in readme and end in readme
    block = readme[readme.index(begin) + len(begin):readme.index(end)]
    assert block == readme_section(results)
    assert set(results["tasks"]) == {"e2e", "parse", "classify"}
