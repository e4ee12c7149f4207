"""The stages of a transfer evaluation (``crossmae transfer``, ``tools/transfer.sh``): how each
registered stage runs on one checkpoint (config, settings, launcher), running them into one
output folder (a finished stage skipped, a stopped one resumed, a folder of another checkpoint's
results refused), and the results table."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from omegaconf import OmegaConf

from ..checkpoint import read_torch_file, strict_json, write_text_atomic
from ..config import ConfigError
from ..data.loader import STOP_SIGNALS
from ..models.sizes import get_size, size_of_state_dict
from ..task import Task

REPO = Path(__file__).resolve().parents[2]  # configs/ and tools/ are found from here
ABSENT = object()
SMOKE_SETTINGS = ["data.num_workers=0", "train.device=cpu", "train.precision=fp32",
                  "log.every_steps=1"]  # fmt: skip


@dataclass
class Plan:
    """How one stage runs: its task, config file and settings (``extra``: its ``<STAGE>_ARGS``)."""

    task: type[Task]
    config: Path
    settings: list[str]
    extra: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.extra = shlex.split(os.environ.get(f"{self.task.transfer.name.upper()}_ARGS", ""))


def stage_configs(items: list[str], chosen: list[str]) -> dict[str, Path]:
    """``--config STAGE=FILE`` options: stage -> config file, each stage among those run and each
    file present."""
    configs = {}
    for item in items:
        stage, eq, file = item.partition("=")
        if not eq or not file:
            raise ConfigError(f"--config {item}: write STAGE=FILE, e.g. frozen=configs/cls/"
                              "frozen_cifar10_tiny.yaml")  # fmt: skip
        if stage not in chosen:
            raise ConfigError(f"--config {item}: {stage} is not among the stages run "
                              f"({' '.join(chosen)})")  # fmt: skip
        path = Path(file) if Path(file).is_absolute() else Path.cwd() / file
        if not path.is_file():
            raise ConfigError(f"--config {item}: {file} does not exist")
        configs[stage] = path.resolve()
    return configs


def make_plans(tasks: list[type[Task]], ckpt: Path, out: Path, configs: dict[str, Path], *,
               smoke: bool, scratch: Path | None = None) -> dict[str, Plan]:  # fmt: skip
    """Each stage's plan for one checkpoint (``--smoke``: on the shared data, in ``scratch``,
    default ``out/smoke_data``), ``configs`` replacing the stages' own config files."""
    if smoke:
        plans = smoke_plans(tasks, scratch or out / "smoke_data")
    else:
        plans = full_plans(tasks, ckpt, configs)
    for name, config in configs.items():
        plans[name].config = config
    return plans


def evaluate_checkpoint(ckpt: Path, out: Path, plans: dict[str, Plan], *, smoke: bool) -> int:
    """Every stage of ``plans`` on ``ckpt`` into ``out`` (a stage done already is skipped), then
    the results table; 1 if a stage failed or was stopped (``STOPPED``)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, plan in plans.items():  # a folder of another checkpoint's run is not reused
        launch_command(plan, smoke)  # the launch settings, checked before any stage runs
        claim_stage(out / name, stage_record(ckpt, plan))
    failed = []
    for name, plan in plans.items():
        if stage_result(out / name) is not None:
            print(f"== {name}: done already ({out / name / 'results.json'}), skipped", flush=True)
            continue
        log_file = out / f"{name}.log"
        print(f"== {name}: {' '.join(plan.task.command)} --config {plan.config} (log: "
              f"{log_file})", flush=True)  # fmt: skip
        code = run_stage(plan, ckpt, out / name, log_file, smoke=smoke)
        if STOPPED:
            print(f"== {name}: stopped (see {log_file})", flush=True)
            break
        if code != 0:
            print(f"== {name}: FAILED (see {log_file})", flush=True)
            failed.append(name)
    status = write_table(out, ckpt, plans, smoke=smoke)
    if STOPPED:
        print(f"crossmae transfer: stopped by {signal.Signals(STOPPED[0]).name} during {name}; "
              "the same command continues where it stopped", file=sys.stderr)  # fmt: skip
        return 1
    if failed:
        print(f"crossmae transfer: failed stage(s): {' '.join(failed)}", file=sys.stderr)
        return 1
    return status


def smoke_plans(chosen: list[type[Task]], scratch: Path) -> dict[str, Plan]:
    """Each stage's smoke config and settings on the shared data (prepared in ``scratch``), on
    the CPU."""
    shared = Path(os.environ.get("CROSSMAE_SHARED", REPO.parent / "shared"))
    if not (shared / "data").is_dir():
        raise ConfigError(f"--smoke reads {shared / 'data'} (set CROSSMAE_SHARED)")
    plans = {}
    for task in chosen:
        if task.transfer.smoke is None:
            raise ConfigError(f"stage {task.transfer.name!r} has no smoke run (its TransferStage "
                              "sets no smoke); leave it out of --stages")  # fmt: skip
        config, settings = task.transfer.smoke(shared.resolve(), scratch)
        schema = OmegaConf.structured(task.schema)  # an evaluation has no precision, no log
        ours = [kv for kv in SMOKE_SETTINGS if OmegaConf.select(
            schema, kv.split("=")[0], default=ABSENT) is not ABSENT]  # fmt: skip
        plans[task.transfer.name] = Plan(task, REPO / config, [*settings, *ours])
    return plans


def full_plans(chosen: list[type[Task]], ckpt: Path, configs: dict[str, Path]) -> dict[str, Plan]:
    """Each stage's config for the encoder's size (or ``configs``') and its dataset settings,
    every file it names checked before anything runs. A stage's dataset variable is needed
    unless ``configs`` gives its config (which then names its data); set, it still applies."""
    missing = [f"{var} (for {t.transfer.name})" for t in chosen if t.transfer.name not in configs
               for var in t.transfer.datasets if not os.environ.get(var)]  # fmt: skip
    if missing:
        raise ConfigError(f"set the dataset root(s): {' '.join(missing)}")
    size = None
    plans = {}
    for task in chosen:
        stage = task.transfer
        if stage.name in configs:
            config = configs[stage.name]
        else:
            size = size or os.environ.get("ARCH") or encoder_size(ckpt)
            get_size(size)  # a known size
            found = sorted(REPO.glob(stage.config.format(size=size)))
            if not found:
                raise ConfigError(f"no {stage.name} config for ARCH={size}: "
                                  f"{stage.config.format(size=size)} does not exist (or give "
                                  f"one: --config {stage.name}=FILE)")  # fmt: skip
            config = found[0]
        settings = [s.format(root=os.environ[var]) for var, items in stage.datasets.items()
                    if os.environ.get(var) for s in items]  # fmt: skip
        for kv in settings:  # every dataset path a stage reads must exist
            key, _, value = kv.partition("=")
            if value.startswith("/") and not Path(value).exists():
                raise ConfigError(f"{stage.name}: {key}={value} does not exist")
        plans[stage.name] = Plan(task, config, settings)
    return plans


def encoder_size(ckpt: Path) -> str:
    """The size name of a checkpoint's encoder (any of our formats or an official release)."""
    data = read_torch_file(ckpt)
    if not isinstance(data, dict):
        raise ConfigError(f"{ckpt} holds no state dict")
    tensors = data.get("model") or data.get("encoder") or data
    try:
        return size_of_state_dict(tensors).name
    except ValueError as e:
        raise ConfigError(f"{ckpt}: {e}; set ARCH") from None


def launch_command(plan: Plan, smoke: bool) -> tuple[list[str], list[str]]:
    """torchrun on this node's processes (NNODES > 1: every node; one process: the command
    itself), or a Slurm job through tools/submit.py (LAUNCHER=slurm, which resumes every job it
    submits): the command before the stage's settings and after them."""
    env = os.environ
    python = env.get("PYTHON", sys.executable)
    launcher = env.get("LAUNCHER", "torchrun")
    if launcher not in ("torchrun", "slurm"):
        raise ConfigError(f"LAUNCHER must be torchrun or slurm, not {launcher!r}")
    nproc = env.get("NPROC") or ("1" if smoke else "8" if launcher == "slurm" else gpu_count())
    if not nproc.isdigit() or int(nproc) < 1:
        raise ConfigError(f"NPROC must be a number of processes, not {nproc!r}")
    nnodes = env.get("NNODES", "1")
    if not nnodes.isdigit() or int(nnodes) < 1:
        raise ConfigError(f"NNODES must be a number of nodes, not {nnodes!r}")
    if launcher == "slurm":
        return [python, str(REPO / "tools" / "submit.py"), "--task", " ".join(plan.task.command),
                "--wait", "--nodes", nnodes, "--gpus-per-node", nproc,
                *shlex.split(env.get("SLURM_ARGS", ""))], []  # fmt: skip
    resume = ["--resume", "auto"]  # a task that trains nothing evaluates again
    if int(nnodes) == 1 and nproc == "1":  # one process: no launcher needed
        return [python, "-m", "crossmae", *plan.task.command], resume
    if int(nnodes) > 1:
        for var in ("NODE_RANK", "MASTER_ADDR"):
            if var not in env:
                raise ConfigError(f"NNODES={nnodes}: set {var}")
        where = ["--nnodes", nnodes, "--node-rank", env["NODE_RANK"], "--master-addr",
                 env["MASTER_ADDR"], "--master-port", env.get("MASTER_PORT", "29500")]  # fmt: skip
    else:
        where = ["--standalone", "--nnodes", "1"]
    return [python, "-m", "torch.distributed.run", *where, "--nproc-per-node", nproc,
            "-m", "crossmae", *plan.task.command], resume  # fmt: skip


def gpu_count() -> str:
    if shutil.which("nvidia-smi") is None:
        return "1"
    res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return str(max(1, sum(line.startswith("GPU") for line in res.stdout.splitlines())))


def stage_record(ckpt: Path, plan: Plan) -> dict:
    """What a stage's results belong to: the checkpoint (path, size, time) and the settings."""
    st = ckpt.stat()
    return {"checkpoint": str(ckpt), "checkpoint_bytes": st.st_size,
            "checkpoint_mtime": st.st_mtime, "config": str(plan.config),
            "settings": [*plan.settings, *plan.extra]}  # fmt: skip


def claim_stage(stage_dir: Path, record: dict) -> None:
    """Keep ``record`` in ``stage_dir/transfer.json``; a folder that holds a run of another
    checkpoint (or of the same path rewritten since) or of other settings is refused, naming
    both: its results are not this checkpoint's."""
    path = stage_dir / "transfer.json"
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is None and (stage_dir / "config.yaml").is_file():  # a run without a record
        from omegaconf import OmegaConf

        ran = OmegaConf.select(OmegaConf.load(stage_dir / "config.yaml"), "encoder.checkpoint")
        old = {**record, "checkpoint": ran} if ran != record["checkpoint"] else record
    if old is not None and old != record:
        changes = "; ".join(f"{k}: {old.get(k)} -> {v}" for k, v in record.items()
                            if old.get(k) != v)  # fmt: skip
        raise ConfigError(f"{stage_dir} holds a run of {old.get('checkpoint')}, not of this "
                          f"checkpoint with these settings ({changes}): choose another output "
                          f"folder, or delete {stage_dir} to run the stage again")  # fmt: skip
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")


def run_stage(plan: Plan, ckpt: Path, out: Path, log_file: Path, *, smoke: bool) -> int:
    """One stage, its output shown and kept in ``log_file``; returns its exit status."""
    before, after = launch_command(plan, smoke)
    cmd = [*before, "--config", str(plan.config), *plan.settings, f"encoder.checkpoint={ckpt}",
           f"output_dir={out}", *plan.extra, *after]  # fmt: skip
    with (
        open(log_file, "a", buffering=1) as log,  # line by line: followable with tail -f
        subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        ) as proc,  # fmt: skip
        Forwarded(proc) as stop,
    ):
        for line in proc.stdout:  # until the stage ends, a stopped one included
            sys.stdout.write(line)
            log.write(line)
        sys.stdout.flush()
    STOPPED.extend([stop.signum] if stop.signum else [])
    return proc.returncode


STOPPED: list[int] = []  # stop signals received while a stage ran


class Forwarded:
    """While a stage runs (in its own session, so that a terminal's Ctrl-C or ``timeout``
    reaches it once, through here): a stop signal is passed on to the stage's processes, which
    checkpoint and exit, and this command waits for them instead of dying first."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.signum, self.previous = proc, None, {}

    def __enter__(self) -> Forwarded:
        for s in STOP_SIGNALS:
            self.previous[s] = signal.signal(s, self.forward)
        return self

    def forward(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def stage_result(stage_dir: Path) -> dict | None:
    """The stage's final ``results.json``, or None while it is missing or from a stopped run."""
    path = stage_dir / "results.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return None if result.get("interrupted") or result.get("diverged") else result


def fmt(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


SMOKE_BANNER = ("> **Smoke run**: each stage trained a few steps on a few images of the shared "
                "data (tiny splits and inputs, CPU) to check the wiring from checkpoint to table. "
                "The numbers say nothing about the encoder: on a dozen validation images a top-1 "
                "moves in steps of several points, and AP is undefined when no detection clears "
                "the test threshold.")  # fmt: skip


def write_table(out: Path, ckpt: Path, plans: dict[str, Plan], *, smoke: bool = False) -> int:
    """OUT/results.json and results.md from the stages' results (a smoke run's marked as such,
    a missing value's reason beside it); 1 if a stage is missing."""
    rows = {}
    for name, plan in plans.items():
        result = stage_result(out / name)
        config = out / name / "config.yaml"
        metrics = {} if result is None else plan.task.transfer.numbers(result)
        rows[name] = {"status": "done" if result is not None else "missing",
                      "output_dir": str(out / name),
                      "config": str(config) if config.is_file() else None,
                      "note": metrics.pop("note", None), "metrics": metrics}  # fmt: skip
    written = datetime.now(UTC).isoformat(timespec="seconds")
    numbers = {k: v for r in rows.values() for k, v in r["metrics"].items()}
    summary = {"checkpoint": str(ckpt), "written": written, "smoke": smoke, "stages": rows,
               **numbers}  # fmt: skip
    write_text_atomic(out / "results.json", strict_json(summary, indent=1) + "\n")
    lines = [f"# Transfer results of `{summary['checkpoint']}`", ""]
    if smoke:
        lines += [SMOKE_BANNER, ""]
    lines += ["| stage | metric | value | config | status |", "|---|---|---|---|---|"]
    notes = []
    for name, row in rows.items():
        for label, keys in plans[name].task.transfer.columns:
            value = " / ".join(fmt(row["metrics"].get(k)) for k in keys)
            if row["note"] and "—" in value:
                notes.append(f"{name}: {row['note']}")
                value += f" ({len(notes)})"
            lines.append(f"| {name} | {label} | {value} | {row['config'] or '—'} | "
                         f"{row['status']} |")  # fmt: skip
    lines.append("")
    if notes:
        lines += [*(f"({i}) {note}" for i, note in enumerate(notes, 1)), ""]
    lines += [f"Written {summary['written']}; the same in results.json.", ""]
    write_text_atomic(out / "results.md", "\n".join(lines))
    print("\n".join(lines))
    return 0 if all(r["status"] == "done" for r in rows.values()) else 1
