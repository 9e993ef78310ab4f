"""The CLI under bad input (issue 15, M5): exit 2 with a one-line message naming the flag, never a traceback,
and every argument and output path is checked before any training starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import save_file

import minilora.cli
from minilora import backend as bk
from minilora import lora
from minilora.cli import build_parser, main
from minilora.io import digest
from minilora.models import load_base
from minilora.train import TrainingDivergedError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_training(monkeypatch):
    """Any call of finetune/pretrain fails the test: the checks must come first."""
    def trained(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(minilora.cli, "finetune", trained)
    monkeypatch.setattr(minilora.cli, "pretrain", trained)
    monkeypatch.setattr(minilora.cli, "run_demo", trained)
    monkeypatch.setattr(minilora.cli, "run_experiment", trained)


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--task", "e2e", "--lr", "nan"], "argument --lr: must be (0, 1], got nan"),
    (["finetune", "--task", "e2e", "--lr", "1e39"], "argument --lr: must be (0, 1], got 1e39"),
    (["finetune", "--task", "e2e", "--lr", "fast"], "argument --lr: 'fast' is not a number"),
    (["finetune", "--task", "e2e", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["finetune", "--task", "e2e", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["finetune", "--task", "e2e", "--r", "0"], "argument --r: must be >= 1, got 0"),
    (["finetune", "--task", "e2e", "--alpha", "inf"], "argument --alpha: must be > 0 and finite, got inf"),
    (["finetune", "--task", "e2e", "--targets", "q,,v"], "argument --targets: 'q,,v': give comma-separated"),
    (["pretrain", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["generate", "x", "--temperature", "0"], "argument --temperature: must be > 0 and finite, got 0"),
    (["generate", "x", "--max-new-tokens", "-3"], "argument --max-new-tokens: must be >= 1, got -3"),
])
def test_bad_flags_name_the_flag_and_exit_2(capsys, no_training, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_targets_may_have_spaces():
    args = build_parser().parse_args(["finetune", "--task", "e2e", "--targets", "q, v"])
    assert args.targets == ("q", "v")
    assert build_parser().parse_args(["finetune", "--task", "e2e"]).targets == ("q", "v")


@pytest.mark.parametrize("make, message", [
    (lambda out: out.write_text("a file"), "--out {out}: is a file, not a folder"),
    (lambda out: (out / "classify.safetensors").mkdir(parents=True), "--out: {out}/classify.safetensors is a directory"),
])
def test_output_paths_are_checked_before_training(tmp_path, capsys, no_training, make, message):
    out = tmp_path / "out"
    make(out)
    assert main(["finetune", "--task", "classify", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(out=out) in err, err


def test_pretrain_and_demo_check_their_outputs_first(tmp_path, capsys, no_training):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["pretrain", "--out", str(blocker), "--no-progress"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["demo", "--fast", "--out", str(blocker)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["demo", "--fast", "--out", str(tmp_path / "o"), "--json", str(tmp_path)]) == 2
    assert "--json: " in capsys.readouterr().err


def test_a_diverged_run_is_a_message(monkeypatch, tmp_path, capsys):
    def diverges(*args, **kwargs):
        raise TrainingDivergedError("loss became nan at step 3: training stopped before applying the update.")

    monkeypatch.setattr(minilora.cli, "finetune", diverges)
    assert main(["finetune", "--task", "e2e", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("minilora finetune: error: loss became nan at step 3: training stopped before "
                                       "applying the update.\n")


def test_generate_refuses_an_adapter_with_an_absurd_alpha(tmp_path, capsys):
    """alpha = 1e308 gave NaN logits, and `minilora generate` printed an empty line with exit 0."""
    base = load_base()
    lora.apply_lora(base, lora.LoRAConfig(r=2, alpha=4, target_modules=("q", "v")), "e2e")
    path = tmp_path / "e2e.safetensors"
    lora.save_adapter(path, base, "e2e")
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads(f.metadata()["minilora"])
    meta["config"]["alpha"] = 1e308
    del meta["sha256"]
    meta["sha256"] = digest(arrays, meta)
    save_file(arrays, str(path), metadata={"minilora": json.dumps(meta)})
    assert main(["generate", "name[the eagle]", "--adapter", str(path)]) == 2
    err = capsys.readouterr().err
    assert "outside (0, 10000]" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", [
    pytest.param("cupy", marks=pytest.mark.skipif(bk.cupy_available(), reason="CuPy works here: not an error")),
    "tpu",
])
def test_a_bad_backend_variable_is_a_message_not_a_traceback(name):
    env = {**os.environ, "MINILORA_BACKEND": name, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "minilora.cli", "generate", "name[the eagle]"], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"minilora generate: error: environment variable MINILORA_BACKEND='{name}': ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
