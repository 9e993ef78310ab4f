"""The command line: ``minilora demo | pretrain | finetune | generate | experiment | bench``
(``finetune --joint``: several adapters together; ``finetune --base HF_DIR --text FILE``: a Hugging
Face GPT-2 on your text), and the Hugging Face bridge ``export | import-peft | analyze``
(``minilora.hf.commands``)."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import stat
import sys
from pathlib import Path

from . import lora
from .allocator import keep_freed_memory
from .backend import BackendUnavailableError
from .data import TASKS, Tokenizer, prompt_ids
from .demo import run_demo
from .experiments import EXPERIMENTS, render_report, run_experiment
from .generate import DECODING_METHODS, generate
from .hf import commands as hf_commands
from .joint import finetune_joint
from .methods import HYPERPARAMS, lora_alpha
from .models import load_base, save_model
from .models.pretrained import BASE_CONFIG, BASE_WEIGHTS
from .recipes import PRETRAIN_SETTINGS, finetune, pretrain
from .train import TrainingDivergedError

__all__ = ["main"]

# `minilora bench` runs the harness of the source checkout this package sits in (it is not installed with it)
BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


# ----------------------------------------------------------------------------- argument checks
# argparse turns an ArgumentTypeError into "argument --flag: <message>" and exit 2, so every
# message names its flag; these run before any model is loaded or trained.
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(high: float = math.inf):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and 0.0 < value <= high):
            limit = f"(0, {high:g}]" if math.isfinite(high) else "> 0 and finite"
            raise argparse.ArgumentTypeError(f"must be {limit}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _targets(text: str) -> tuple:
    names = tuple(t.strip() for t in text.split(","))
    if not names or any(not t or " " in t for t in names):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated layer names such as q,v")
    return names


def _check_folder(flag: str, folder: str, files=()) -> None:
    """``--flag folder`` must be (or become) a writable folder, and ``files`` inside it must be writable files."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{flag} {folder}: is a file, not a folder; give a folder to write into")
    parent = folder
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder}: permission denied ({parent} is not writable for this user)")
    for name in files:
        _check_file(flag, os.path.join(folder, name))


def _check_file(flag: str, path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path} is a directory, so the output file cannot be written there")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{flag}: {path} exists and is not a regular file")


def _cmd_demo(args) -> int:
    _check_folder("--out", args.out)
    if args.json:
        _check_file("--json", args.json)
    run_demo(fast=args.fast, json_path=args.json, out_dir=args.out, progress=not args.no_progress, workers=args.workers)
    return 0


def pretrain_plan(settings: dict) -> str:
    """What ``minilora pretrain`` is about to run, phase by phase (printed before the first step)."""
    s = settings
    lines = [f"pretrain plan: {s['steps'] + s['second_steps']:,} steps of {s['batch_size']} corpus lines",
             f"  phase 1: {s['steps']:,} steps at peak lr {s['lr']:g} (warm-up {s['warmup_steps']}) on "
             f"{s['n_texts']:,} lines"]
    if s["second_steps"]:
        lines.append(f"  phase 2: {s['second_steps']:,} steps at peak lr {s['second_lr']:g} on {s['second_n_texts']:,} "
                     "fresh lines (--second-steps 0: none)")
    else:
        lines.append("  phase 2: none (--second-steps N adds it)")
    return "\n".join(lines)


def _cmd_pretrain(args) -> int:
    weights = os.path.join(args.out, "base.safetensors") if args.out else BASE_WEIGHTS
    config = os.path.join(args.out, "base.json") if args.out else BASE_CONFIG
    _check_folder("--out", os.path.dirname(weights) or ".", [os.path.basename(weights), os.path.basename(config)])
    settings = {name: getattr(args, name) for name in PRETRAIN_SETTINGS}  # one option per setting
    # --steps alone means "this many steps": the first phase only, unless --second-steps is given too
    if settings["second_steps"] is None:
        settings["second_steps"] = 0 if settings["steps"] is not None else PRETRAIN_SETTINGS["second_steps"]
    if settings["steps"] is None:
        settings["steps"] = PRETRAIN_SETTINGS["steps"]
    args.steps, args.second_steps = settings["steps"], settings["second_steps"]
    print(pretrain_plan(settings), flush=True)
    _, history, held_out = pretrain(**settings, seed=args.seed, out_weights=weights, out_config=config,
                                    progress=not args.no_progress)
    print(f"pretrained {args.steps} + {args.second_steps} steps in {history.seconds:.1f} s; final train loss {history.losses[-1]:.4f}, "
          f"held-out LM loss {held_out:.4f}")
    print(f"wrote {weights} ({os.path.getsize(weights) / 1e6:.2f} MB) and {config}")
    return 0


def _cmd_finetune_joint(args, tasks) -> int:
    if args.method != "lora":
        raise ValueError(f"--joint trains one LoRA adapter per task in a mixed batch; it needs --method lora, "
                         f"not {args.method!r} (full fine-tuning has one set of weights for every task)")
    targets = tuple(args.targets) if args.targets else None
    result = finetune_joint(tasks, steps=args.steps, batch_size=args.batch_size, lr=args.lr, r=args.r,
                            alpha=args.alpha, targets=targets, seed=args.seed, progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    for task, run in result.runs.items():
        path = os.path.join(args.out, f"{task}.safetensors")
        lora.save_adapter(path, result.model, adapter_name=task)
        print(f"{task}/lora (joint): {run.metric_name} = {run.metric:.3f} on the test split; trainable "
              f"{run.trainable_params:,}; wrote {path} ({os.path.getsize(path) / 1e3:.1f} kB)")
    print(f"trained {len(tasks)} adapters in one mixed batch: {result.train_seconds:.1f} s")
    return hf_commands.untrained_exit(result.model, list(result.runs))


def _task_list(value: str) -> tuple:
    """``--task e2e`` or ``--task e2e,parse,classify``: distinct known task names."""
    tasks = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise argparse.ArgumentTypeError(f"{value!r}: give distinct task names from {', '.join(TASKS)}")
    return tasks


def _check_lora_flags(args) -> None:
    """--r and --alpha within the limits every adapter reader shares, checked before anything is loaded."""
    if args.method != "lora":
        return
    alpha = lora_alpha(args.r, args.alpha)
    try:
        lora.config.check_scaling(alpha, args.r, where=f"--r {args.r} --alpha {alpha:g}")
    except ValueError as exc:
        raise ValueError(f"{exc} (an adapter file outside these limits would not load)") from None


def _cmd_finetune(args) -> int:
    _check_lora_flags(args)
    if args.base or args.text:  # LoRA on an imported GPT-2 and a text file
        return hf_commands.cmd_finetune_text(args)
    if not args.task:
        raise ValueError("finetune needs --task (e2e, parse or classify), or --base HF_DIR --text FILE")
    tasks = args.task
    if args.joint:
        return _cmd_finetune_joint(args, tasks)
    if len(tasks) > 1:
        raise ValueError(f"--task {','.join(tasks)}: several tasks need --joint (one LoRA adapter per task, "
                         "trained together in mixed batches); otherwise give one task")
    args.task = tasks[0]
    targets = args.targets
    name = f"{args.task}.safetensors" if args.method == "lora" else f"{args.task}-full.safetensors"
    _check_folder("--out", args.out, [name, f"{args.task}-full.json"])
    lora_hp = {"r": args.r, "alpha": args.alpha, "targets": targets} if args.method == "lora" else {}
    run = finetune(args.task, args.method, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   progress=not args.no_progress, **lora_hp)
    os.makedirs(args.out, exist_ok=True)
    if args.method == "lora":
        path = os.path.join(args.out, f"{args.task}.safetensors")
        lora.save_adapter(path, run.model, adapter_name=args.task)
    else:
        path = os.path.join(args.out, f"{args.task}-full.safetensors")
        save_model(run.model, path, os.path.join(args.out, f"{args.task}-full.json"), {"task": args.task})
    share = 100.0 * run.trainable_params / run.total_params
    print(f"{args.task}/{args.method}: {run.metric_name} = {run.metric:.3f} on the test split; trainable "
          f"{run.trainable_params:,} of {run.total_params:,} ({share:.2f} %); {run.train_seconds:.1f} s")
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.1f} kB)")
    if args.method == "lora":
        return hf_commands.untrained_exit(run.model, [args.task], getattr(run, "history", None))
    return 0


def _cmd_generate(args) -> int:
    tokenizer = Tokenizer.default()
    model = load_base()
    adapter_ids = None
    if args.adapter:
        name = lora.load_adapter(args.adapter, model)
        adapter_ids = [name]
    model.eval()
    out = generate(model, [prompt_ids(tokenizer, args.prompt)], max_new_tokens=args.max_new_tokens,
                   eos_id=tokenizer.eos_id, method=args.method, num_beams=args.beams,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed, adapter_ids=adapter_ids)
    print(tokenizer.decode(out[0], skip_special=True))
    return 0


def _cmd_experiment(args) -> int:
    if args.name == "report":
        if args.fast:
            raise ValueError("experiment report: --fast shrinks a run; report only renders an existing results.json")
        results = args.results or os.path.join("docs", "results.json")
        if not os.path.isfile(results):
            raise ValueError(f"experiment report: no results file {results!r} (write one with "
                           "`minilora experiment all --out DIR`, then pass --results DIR/results.json)")
        out = args.out or os.path.dirname(os.path.abspath(results))
        _check_folder("--out", out)
        render_report(results, out)
        print(f"wrote {os.path.join(out, 'results.md')} and its figures in {os.path.join(out, 'figures')}")
        return 0
    if args.results:
        raise ValueError(f"experiment {args.name}: --results is for `experiment report`; a run writes OUT/results.json")
    out = args.out or "minilora-out/experiments"
    _check_folder("--out", out)
    result = run_experiment(args.name, out_dir=out, fast=args.fast)
    seconds = result["results"]["seconds"]
    print(f"wrote {os.path.join(out, 'results.json')} and {os.path.join(out, 'results.md')} ({seconds / 60:.1f} min)")
    return 0


def _cmd_exercises(args) -> int:
    from .exercises.key import exercise_table, teacher_key  # the checks import nothing heavy

    print(teacher_key() if args.solutions else exercise_table())
    return 0


def _bench(argv) -> int:
    if not (BENCHMARKS_DIR / "bench.py").is_file():
        print(f"minilora bench: the benchmark harness lives in benchmarks/ of a source checkout of minilora, "
              f"next to the package, and is not installed with it (looked for {BENCHMARKS_DIR / 'bench.py'}); "
              "clone the repository and run `minilora bench` or `python -m benchmarks.bench` from its root",
              file=sys.stderr)
        return 2
    root = str(BENCHMARKS_DIR.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("benchmarks.bench").main(argv, prog="minilora bench")


def _add_demo(sub) -> None:
    """``minilora demo``: full fine-tuning vs LoRA on every demo task, end to end."""
    p = sub.add_parser("demo", help="the main job: full fine-tuning vs LoRA on 3 tasks, merge, mixed-task batch")
    p.add_argument("--fast", action="store_true", help="a short run (for tests, ~30 s)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--out", default="minilora-out", help="folder for PNGs and adapters (default: ./minilora-out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--workers", type=_int_at_least(1), default=None,
                   help="fine-tuning runs at a time, each in its own process (default: one per CPU core, at most 6)")
    p.set_defaults(func=_cmd_demo)


def _add_pretrain(sub) -> None:
    """``minilora pretrain``: train the base GPT that ships as minilora/assets/."""
    p = sub.add_parser("pretrain", help="train the base GPT on the free-description corpus (the shipped asset)")
    # One option per setting of recipes.PRETRAIN_SETTINGS ("--second-lr" sets "second_lr"), its
    # default the shipped one.
    for name, parse, meaning in (
            ("steps", _int_at_least(1), "steps of the first phase"),
            ("batch_size", _int_at_least(1), "corpus lines per step"),
            ("lr", _positive_float(1.0), "learning rate in (0, 1]"),
            ("n_texts", _int_at_least(1), "lines of pretraining corpus"),
            ("embedding_std", _positive_float(1.0), "std of the initial token vectors"),
            ("warmup_steps", _int_at_least(1), "linear warm-up before each cosine decay"),
            ("second_steps", _int_at_least(0), "steps of the second, slower phase; 0: none"),
            ("second_lr", _positive_float(1.0), "peak learning rate of the second phase"),
            ("second_n_texts", _int_at_least(1), "fresh corpus lines for the second phase")):
        default = PRETRAIN_SETTINGS[name]
        shown = f"{default:,}" if isinstance(default, int) else f"{default:g}"
        if name == "second_steps":
            shown += "; 0 when --steps is given without it"
        p.add_argument("--" + name.replace("_", "-"), type=parse, help=f"{meaning} (default {shown})",
                       default=None if name in ("steps", "second_steps") else default)
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--out", default=None, help="folder to write to (default: minilora/assets/)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_pretrain)


def _add_finetune(sub) -> None:
    """``minilora finetune``: one task (LoRA or full), several adapters (--joint), or a Hugging Face base."""
    p = sub.add_parser("finetune", help="adapt the base model to one task (LoRA or full fine-tuning), "
                                        "or several LoRA adapters together (--joint)")
    p.add_argument("--task", type=_task_list, metavar="TASK[,TASK...]",
                   help=f"one of {', '.join(TASKS)}; several, comma-separated, with --joint; not needed with --base HF_DIR --text FILE")
    p.add_argument("--joint", action="store_true",
                   help="LoRA only: one adapter per task, trained together in mixed batches (rows of every task)")
    p.add_argument("--method", default="lora", choices=("lora", "full"))
    lora_hp = HYPERPARAMS["lora"]  # LoRA's defaults: r, targets, and alpha = methods.lora_alpha(r) = 2r
    p.add_argument("--r", type=_int_at_least(1), default=lora_hp["r"], help=f"LoRA rank (default {lora_hp['r']})")
    p.add_argument("--alpha", type=_positive_float(), default=None, help="LoRA alpha (default 2r)")
    p.add_argument("--targets", type=_targets, default=tuple(lora_hp["targets"]),
                   help=f"comma-separated module names to adapt (default {','.join(lora_hp['targets'])})")
    p.add_argument("--steps", type=_int_at_least(1), default=None)
    p.add_argument("--batch-size", type=_int_at_least(1), default=16)
    p.add_argument("--lr", type=_positive_float(1.0), default=None, help="learning rate in (0, 1]")
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--out", default="minilora-out", help="folder for the adapter / model file")
    p.add_argument("--no-progress", action="store_true")
    hf_commands.add_finetune_flags(p)
    p.set_defaults(func=_cmd_finetune)


def _add_generate(sub) -> None:
    """``minilora generate``: decode one prompt, with or without an adapter file."""
    p = sub.add_parser("generate", help="continue a prompt with the base model (and an adapter file)")
    p.add_argument("prompt", help='e.g. "name[the eagle] food[french]"')
    p.add_argument("--adapter", help="a LoRA adapter file written by `minilora finetune`")
    p.add_argument("--method", default="greedy", choices=DECODING_METHODS)
    p.add_argument("--beams", type=_int_at_least(1), default=4)
    p.add_argument("--temperature", type=_positive_float(), default=1.0)
    p.add_argument("--top-k", type=_int_at_least(1), default=None)
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=48)
    p.set_defaults(func=_cmd_generate)


def _add_experiment(sub) -> None:
    """``minilora experiment NAME|all|report``: run the paper's experiments, or render their page."""
    p = sub.add_parser("experiment", help="the paper's experiments in miniature (results.json, tables, PNGs)",
                       description="Run an experiment (or all) into OUT/results.json and its Markdown and PNGs; "
                                   "`report` renders docs/results.md and docs/figures/ from a results.json.")
    p.add_argument("name", choices=EXPERIMENTS + ("all", "report"))
    p.add_argument("--out", default=None, help="run: the output folder (default minilora-out/experiments); "
                                                "report: where results.md goes (default: beside --results)")
    p.add_argument("--results", default=None, help="report: the results.json to render (default docs/results.json)")
    p.add_argument("--fast", action="store_true", help="shrink every run (for tests)")
    p.set_defaults(func=_cmd_experiment)


def _add_exercises(sub) -> None:
    """``minilora exercises``: the course's exercise table, or the teacher's key."""
    p = sub.add_parser("exercises", help="the course's exercises; --solutions: the teacher's key")
    p.add_argument("--solutions", action="store_true",
                   help="print every solution and the answers to the syllabus's 'predict before you run' questions")
    p.set_defaults(func=_cmd_exercises)


def build_parser() -> argparse.ArgumentParser:
    """``minilora``'s parser: one sub-parser per command, in the order ``--help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="minilora",
        description="Learn LoRA (Hu et al. 2021) by building it: demo, pretraining, fine-tuning, generation, "
                    "the paper's experiments in miniature, and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_pretrain, _add_finetune, _add_generate, _add_experiment, _add_exercises):
        add(sub)
    hf_commands.add_parsers(sub)  # export, import-peft, analyze

    # `minilora bench ...` is forwarded to `python -m benchmarks.bench ...` by main(); listed here for --help
    sub.add_parser("bench", help="benchmarks (JSON lines), optionally side by side with PyTorch; "
                                 "see `minilora bench --help`")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # fewer page faults for NumPy's temporaries (see minilora/allocator.py)
    if argv[:1] == ["bench"]:  # every option after `bench` belongs to `python -m benchmarks.bench`
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    # bad input, a file that cannot be read or written, a backend this machine lacks, a run that
    # diverged: the message says what and how to fix it (a traceback would only hide it)
    except (ValueError, OSError, BackendUnavailableError, TrainingDivergedError) as exc:
        print(f"minilora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
