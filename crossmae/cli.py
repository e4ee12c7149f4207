"""Command line: ``crossmae <command> ...`` (also ``python -m crossmae``; under torchrun
``-m crossmae <command> ...``), one entry for everything. The commands are those registered
(``crossmae.task``): each task's training command (``pretrain``, ``cls finetune``, ``det train``,
...), the commands its package adds (``det evaluate``, ...) and crossmae's own (``convert``,
``analyze``, ``benchmark``, ``ablate``, ``transfer``, ``psnr``, ``models``). ``crossmae --help``
lists them.

Training commands take ``--config FILE`` (repeatable), ``--resume auto|PATH`` and ``key=value``
settings; a bad value or a missing file is a one-line error (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from .checkpoint import strict_json
from .checks import int_at_least
from .task import Task, commands, register_command, tasks


# ----------------------------------------------------------------------------- training commands
def settings_help(schema: type) -> str:
    """What a command's ``key=value`` settings are: its schema's sections and required keys."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(schema)
    sections = [k for k in cfg if not OmegaConf.is_missing(cfg, k) and OmegaConf.is_dict(cfg[k])]
    required = sorted(OmegaConf.missing_keys(cfg))
    text = (f"Settings are key=value over the sections {', '.join(sections)} "
            f"({schema.__module__}.{schema.__name__}), after the --config files. ")  # fmt: skip
    return text + (f"Required: {', '.join(required)}." if required else "None is required.")


def training_command(task: type[Task]):
    """The command of a task: ``--config FILE`` (repeatable, merged in order), ``--resume
    auto|PATH`` and ``key=value`` settings, the same for every task; its help names the
    schema's sections and required keys."""

    def configure(p: argparse.ArgumentParser) -> None:
        p.epilog = settings_help(task.schema)
        p.add_argument("--config", action="append", default=[],
                       help="YAML file (repeatable, in order)")  # fmt: skip
        p.add_argument("--resume", default=None, help="'auto' = continue the output_dir's "
                       "last checkpoint (or start fresh; a task that trains nothing evaluates "
                       "again); or a path")  # fmt: skip
        p.add_argument("--force", action="store_true", help="replace the results an earlier "
                       "run left in output_dir")  # fmt: skip
        p.add_argument("--print-config", action="store_true", help="print the resolved config "
                       "(files, _base_, key=value, defaults decided) and exit; nothing is "
                       "written")  # fmt: skip
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.seed=1")
        p.set_defaults(func=lambda args: run_training(task, args))

    return configure


def run_training(task: type[Task], args: argparse.Namespace) -> int:
    """Load the task's config, run it, print its results in one JSON line; status 1 if a stop
    signal ended it."""
    from .config import load_config
    from .hooks import _scalars
    from .runner import run_task

    resume = getattr(args, "resume", None)
    base = resumed_settings(task, args, resume) if resume else None
    cfg = load_config(task.schema, args.config, args.overrides, base=base,
                      complete=not args.print_config)  # fmt: skip
    if args.print_config:
        import torch
        from omegaconf import OmegaConf

        from .runner import resolve

        gpu = torch.cuda.is_available() and cfg.train.device != "cpu"
        print(OmegaConf.to_yaml(resolve(task(cfg), cfg, torch.device("cuda" if gpu else "cpu"))))
        return 0
    result = run_task(task(cfg), cfg, resume, force=args.force)
    brief = {k: v for k, v in result.items() if not isinstance(v, dict | list)}
    print(strict_json({**brief, **_scalars(result.get("metrics") or {})}))
    return 1 if result["interrupted"] else 0


def resumed_settings(task: type[Task], args: argparse.Namespace, resume: str) -> dict | None:
    """The settings of the run ``--resume`` continues (its folder's config.yaml), under the
    command's files and ``key=value``: a run resumes with its own settings unless told
    otherwise, and ``--print-config`` shows them. None when there is nothing to resume."""
    from omegaconf import OmegaConf

    from .checkpoint import latest_checkpoint
    from .config import load_config

    if resume == "auto":
        out = OmegaConf.select(load_config(task.schema, args.config, args.overrides),
                               "output_dir")  # fmt: skip
        ckpt = latest_checkpoint(Path(out)) if out else None
    else:
        ckpt = Path(resume)
    saved = Path(ckpt).parent / "config.yaml" if ckpt else None
    if saved is None or not saved.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(saved))


# ----------------------------------------------------------------------------- crossmae's own
@register_command(("models",), help="list registered models (with --params: their sizes)")
def _models_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name filter")
    p.add_argument("--params", action="store_true", help="count each model's parameters")
    p.set_defaults(func=_models)


def _main_job_model() -> str:
    """The model ``crossmae pretrain`` builds with no settings: its name, what the name does not
    say, and its parameters."""
    import torch

    from .models.registry import describe
    from .pretrain import ModelConfig, build_model

    with torch.device("meta"):
        model = build_model(ModelConfig())
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return f"{describe(model.model_name, model.config)}: {params:.2f}M parameters"


def _models(args: argparse.Namespace) -> int:
    import torch

    from .models import create_model, list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    main_job = _main_job_model()
    if not args.params:
        print("\n".join(names))
        print(f"(crossmae pretrain with no settings builds {main_job})", file=sys.stderr)
        return 0
    print(f"{'model':32s} {'state-dict keys':>15s} {'params (M)':>11s} {'trainable (M)':>14s}")
    for name in names:
        with torch.device("meta"):  # counted, not allocated: no memory, no init cost
            model = create_model(name)
        sd = model.state_dict()
        total = sum(v.numel() for v in sd.values()) / 1e6
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        print(f"{name:32s} {len(sd):15d} {total:11.2f} {trainable:14.2f}")
    print(f"(crossmae pretrain with no settings builds {main_job})", file=sys.stderr)
    return 0


@register_command(
    ("psnr",), help="reconstruction loss and masked-patch PSNR of pretraining checkpoints"
)
def _psnr_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", help="pretraining checkpoints (checkpoint-last.pt)")
    p.add_argument("--data", required=True, help="image folder (ImageFolder or flat)")
    p.add_argument(
        "--images", type=int_at_least(1), default=1000, help="images, spread evenly over the folder"
    )
    p.add_argument("--batch-size", type=int_at_least(1), default=128)
    p.add_argument("--seed", type=int, default=0, help="fixes the masks (and a random init)")
    p.add_argument("--all-masked", action="store_true", help="decode every masked patch (γ = p)")
    p.add_argument(
        "--random-init", action="store_true", help="the checkpoint's architecture, untrained"
    )
    p.add_argument("--out", default=None, help="also write the records to this JSON file")
    p.set_defaults(func=_psnr)


def _psnr(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import PRETRAIN_FORMAT, load_checkpoint, write_text_atomic
    from .models import create_model
    from .models.pretrained import model_from_checkpoint
    from .reconstruction import folder_reconstruction_metrics

    records = []
    for path in args.checkpoints:
        ckpt = load_checkpoint(path, expect=PRETRAIN_FORMAT)
        if args.random_init:
            torch.manual_seed(args.seed)
            model = create_model(ckpt["model_name"], **ckpt["model_config"])
        else:
            model = model_from_checkpoint(ckpt)
        pred_ratio = model.mask_ratio if args.all_masked else None
        metrics = folder_reconstruction_metrics(
            model, args.data, images=args.images, batch_size=args.batch_size, seed=args.seed,
            pred_ratio=pred_ratio, device="cuda" if torch.cuda.is_available() else "cpu",
        )  # fmt: skip
        records.append({"checkpoint": str(path), "model": ckpt["model_name"],
                        "step": ckpt.get("step"),
                        "weights": "random init" if args.random_init else "trained",
                        "data": args.data, "all_masked_decoded": args.all_masked,
                        **metrics})  # fmt: skip
        print(strict_json(records[-1]))
    if args.out:
        write_text_atomic(args.out, json.dumps(records, indent=1) + "\n")
    return 0


# ----------------------------------------------------------------------------- the parser
def plain(doc: str) -> str:
    """A docstring as help text: dedented, its ``literal`` markup shown as `literal`."""
    import inspect

    return inspect.cleandoc(doc).replace("``", "`")


def command_entries() -> dict[tuple[str, ...], dict]:
    """Every registered command (words -> ``help``, ``description``, ``group``, ``configure``),
    each task's training command under its ``command`` words, a group nobody described named
    after its commands' first words."""
    from . import commands as _builtin  # noqa: F401  (registers convert, analyze, ...)

    entries = commands()
    for task in tasks():
        entries[task.command] = {"help": task.help, "description": task.__doc__,
                                 "configure": training_command(task)}  # fmt: skip
    for words in list(entries):
        for k in range(1, len(words)):
            entries.setdefault(words[:k], {"help": f"{' '.join(words[:k])} commands",
                                           "description": None, "configure": None})  # fmt: skip
    return {w: {"help": e["help"], "description": plain(e["description"] or e["help"]),
                "group": e["configure"] is None, "configure": e["configure"]}
            for w, e in entries.items()}  # fmt: skip


def build_parser(keep_index: bool = False) -> argparse.ArgumentParser:
    """The parser of every registered command: groups and their commands as nested
    sub-commands. ``keep_index``: also write the command index (``crossmae.command_index``) if
    it is out of date and every plugin loaded."""
    from . import command_index
    from .task import PLUGIN_ERRORS

    entries, about = command_entries(), plain(__doc__)
    parser, parsers = command_index.build(entries, lambda words, e: e["configure"], about)
    if keep_index and not PLUGIN_ERRORS and command_index.load() is None:
        packages = {"crossmae", *(value.partition(".")[0] for _, value in command_index.plugins())}
        command_index.save(entries, parsers, about, packages)
    return parser


class Stopped(BaseException):
    """A stop signal outside a training loop (which checkpoints first): the command ends."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame) -> None:
    raise Stopped(signum)


_stop.command_stop = True  # the engine's StopRequest does not pass a signal on to this one


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.func(args)``, the one error path of every command: an expected problem (a
    config value, a missing, malformed or unwritable file, a checkpoint of another kind, a run
    whose loss stays non-finite, an evaluation that failed: ``ConfigError``, ``OSError``,
    ``ValueError``, ``KeyError``, ``FloatingPointError``, ``EvaluationError`` and the command's
    own ``errors``) prints one line naming it and
    returns 2; Ctrl-C prints one line and returns 130, another stop signal (SIGTERM, SIGHUP,
    ...: ``STOP_SIGNALS``) one line and 128 + its number, the run folder's lock released either
    way; anything else keeps its traceback."""
    from omegaconf.errors import MissingMandatoryValue

    from .config import ConfigError
    from .data.loader import STOP_SIGNALS
    from .evaluation import EvaluationError

    expected = (ConfigError, OSError, ValueError, KeyError, MissingMandatoryValue,
                FloatingPointError, EvaluationError, *getattr(args, "errors", ()))  # fmt: skip
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    previous = {}
    for s in STOP_SIGNALS:
        if s != signal.SIGINT and signal.getsignal(s) is signal.SIG_DFL:
            previous[s] = signal.signal(s, _stop)
    try:
        return args.func(args)
    except (KeyboardInterrupt, Stopped) as e:  # outside a training loop (which checkpoints)
        # the process ends: what the signal cut short while it was being built (a data loader
        # starting its workers) may fail in its destructor; that is not news to print
        sys.unraisablehook = lambda unraisable: None
        if isinstance(e, KeyboardInterrupt):
            print(f"crossmae {command}: interrupted", file=sys.stderr)
            return 130
        print(f"crossmae {command}: stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum
    except expected as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # no repr quotes
        if isinstance(e, MissingMandatoryValue):
            message = f"set the required value {e.full_key}=..."
        print(f"crossmae {command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser``'s arguments, with ``key=value`` settings allowed anywhere (argparse takes a
    command's positionals in one run, so settings after an option would be left over)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(keep_index=True), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return run_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
