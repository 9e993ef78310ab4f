"""The CLI under bad input: exit 2 with a one-line message naming the flag, never a traceback,
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


# ----------------------------------------------------------------------------- limits, ignored options, plans
@pytest.mark.parametrize("argv, message", [
    (["finetune", "--task", "e2e", "--alpha", "100000"], "--r 4 --alpha 100000: alpha 100000 with r 4 gives the "
                                                          "scaling s = alpha / r = 2.5e+04, outside (0, 10000]"),
    (["finetune", "--task", "e2e", "--alpha", "1e300"], "outside (0, 10000]"),
    (["finetune", "--task", "e2e,parse", "--joint", "--r", "1", "--alpha", "20000"], "outside (0, 10000]"),
])
def test_lora_flags_outside_the_limits_of_adapter_files_exit_2_before_training(capsys, no_training, argv, message):
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("extra, message", [
    (["--method", "full"], "--method full: not used with --base HF_DIR --text FILE"),
    (["--joint", "--task", "e2e"], "--joint, --task: not used with --base HF_DIR --text FILE"),
    (["--name", ""], "--name: adapter name '' is not allowed"),
    (["--block-size", "0"], "--block-size 0: give a number of tokens >= 1"),
    (["--block-size", "-5"], "--block-size -5: give a number of tokens >= 1"),
])
def test_finetune_on_text_refuses_options_it_would_ignore(tmp_path, capsys, extra, message):
    text = tmp_path / "t.txt"
    text.write_text("hello " * 50)
    assert main(["finetune", "--base", str(tmp_path / "no-such-gpt2"), "--text", str(text), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_finetune_on_text_names_the_file_and_flag_of_a_decode_error(tmp_path, capsys):
    from minilora import hf
    from minilora.models import GPT, GPTConfig

    tokenizers = pytest.importorskip("tokenizers", reason="finetune --text needs the tokenizers package")
    folder = tmp_path / "gpt2"
    hf.save_gpt2(folder, GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, d_model=8)))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.save(str(folder / "tokenizer.json"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café ".encode("latin-1") * 40)
    assert main(["finetune", "--base", str(folder), "--text", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--text {bad}: not UTF-8 text (invalid continuation byte at byte 3)" in err, err


def test_analyze_refuses_a_base_that_does_not_load_or_does_not_fit(tmp_path, capsys):
    from minilora import hf
    from minilora.models import GPT, GPTConfig

    model = load_base()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q",)))
    lora.save_adapter(tmp_path / "a.safetensors", model)
    assert main(["analyze", str(tmp_path / "a.safetensors"), "--base", "/nonexistent", "--out", str(tmp_path / "o")]) == 2
    assert "--base /nonexistent: /nonexistent: no such folder" in capsys.readouterr().err
    hf.save_gpt2(tmp_path / "small", GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, d_model=8)))
    assert main(["analyze", str(tmp_path / "a.safetensors"), "--base", str(tmp_path / "small"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "the adapter is for another model" in capsys.readouterr().err


def test_export_checks_both_output_folders_before_writing_either(tmp_path, capsys):
    model = load_base()
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q",)))
    lora.save_adapter(tmp_path / "a.safetensors", model)
    (tmp_path / "taken").write_text("x")
    argv = ["export", "--adapter", str(tmp_path / "a.safetensors"), "--base-to-hf", str(tmp_path / "new"),
            "--to-peft", str(tmp_path / "taken")]
    assert main(argv) == 2
    assert f"--to-peft {tmp_path / 'taken'}: is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_run_that_leaves_the_adapter_at_its_start_exits_1_with_a_warning(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["finetune", "--task", "e2e", "--steps", "1", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "adapter(s) ['e2e'] are unchanged from their initialisation" in err
    assert "the learning rate was 0 at every one of its 1 step(s)" in err
    model = load_base()
    lora.load_adapter(out / "e2e.safetensors", model)
    assert lora.adapter_unchanged(model, "e2e")
    for _, layer in lora.lora_layers(model):
        layer.lora_B["e2e"].data[0, 0] = 1e-3
        break
    assert not lora.adapter_unchanged(model, "e2e")


def test_pretrain_prints_its_plan_and_steps_alone_runs_the_first_phase_only(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_pretrain(**kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(minilora.cli, "pretrain", fake_pretrain)
    assert main(["pretrain", "--steps", "2", "--out", str(tmp_path), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert seen["steps"] == 2 and seen["second_steps"] == 0
    assert "pretrain plan: 2 steps of 32 corpus lines" in out and "phase 2: none" in out, out
    assert main(["pretrain", "--steps", "2", "--second-steps", "3", "--out", str(tmp_path), "--no-progress"]) == 2
    assert seen["second_steps"] == 3 and "phase 2: 3 steps at peak lr 0.002" in capsys.readouterr().out
    assert main(["pretrain", "--out", str(tmp_path), "--no-progress"]) == 2
    assert (seen["steps"], seen["second_steps"]) == (1500, 12000)
    assert "pretrain plan: 13,500 steps" in capsys.readouterr().out
