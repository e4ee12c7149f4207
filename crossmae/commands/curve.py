"""Transfer curves: every checkpoint a pretraining run kept (``log.keep_every_epochs``: the
encoder as ``encoder-epochN.pt``) evaluated with the same transfer stages, then each metric
against the pretraining epoch (OUT/curve.md, curve.json, curve.png), starting at epoch 0: the
same architecture untrained, the control every later point is read against.

    tools/transfer.sh --curve runs/crossmae_b OUT                   # the cheap stages (kNN + probe)
    tools/transfer.sh --curve runs/crossmae_b OUT --watch           # while the run goes on
    tools/transfer.sh --curve runs/cifar OUT --config frozen=configs/cls/frozen_cifar10_tiny.yaml

Each kept checkpoint's stages run in OUT/epochN/ as ``crossmae transfer`` runs them for one
checkpoint (so under ``LAUNCHER=slurm`` each evaluation is its own job); one evaluated already is
skipped, so the command can be run again while the pretraining goes on. ``--watch`` polls the run
folder until the run has finished and its final kept checkpoint is evaluated.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from ..checkpoint import strict_json, write_text_atomic
from ..config import ConfigError
from ..task import Task
from . import stages as st

KEPT = re.compile(r"(encoder|checkpoint)-epoch(\d+)\.pt")


def kept_checkpoints(run: Path) -> dict[int, Path]:
    """Pretraining epoch -> the checkpoint kept then: ``encoder-epochN.pt``, or the whole
    ``checkpoint-epochN.pt`` that older runs kept."""
    found: dict[int, Path] = {}
    for f in sorted(run.glob("*-epoch*.pt")):  # checkpoint-... sorts before encoder-...
        if m := KEPT.fullmatch(f.name):
            found[int(m[2])] = f
    return dict(sorted(found.items()))


def check_one_model(kept: dict[int, Path]) -> None:
    """Kept checkpoints of one model: another model's (a run folder reused with another model
    name, patch size or depth) would draw two runs as one curve."""
    seen: dict[str, list[int]] = {}
    for epoch, path in kept.items():
        seen.setdefault(encoder_description(path), []).append(epoch)
    if len(seen) > 1:
        groups = "; ".join(f"epochs {', '.join(map(str, e))}: {json.loads(c)}"
                           for c, e in seen.items())  # fmt: skip
        raise ConfigError(f"the kept checkpoints are of {len(seen)} different encoders ({groups})"
                          ": one curve is one model; move the other run's files away")  # fmt: skip


_DESCRIBED: dict[tuple[str, int], str] = {}  # (file, mtime) -> its encoder's settings


def encoder_description(path: Path) -> str:
    """A kept file's encoder settings as JSON, read once per file (memory-mapped: the weights
    are not read)."""
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _DESCRIBED:
        import torch

        from ..models.pretrained import load_pretrained_encoder

        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        config = ckpt.get("encoder_config") if isinstance(ckpt, dict) else None
        if config is None:  # a whole checkpoint (older runs)
            config = load_pretrained_encoder(path)[1]
        _DESCRIBED[key] = json.dumps(config, sort_keys=True)
    return _DESCRIBED[key]


def run_state(run: Path) -> str:
    """``running`` (no results.json yet), ``stopped`` (interrupted: it may be resumed),
    ``diverged`` or ``done``."""
    path = run / "results.json"
    if not path.is_file():
        return "running"
    result = json.loads(path.read_text())
    if result.get("interrupted"):
        return "stopped"
    return "diverged" if result.get("diverged") else "done"


def run_curve(args, tasks: list[type[Task]], configs: dict[str, Path]) -> int:
    """Evaluate the run folder's kept checkpoints not evaluated yet, write the curve; with
    ``args.watch`` again every ``args.poll`` seconds until the run is over."""
    run = Path(args.checkpoint).resolve()
    if not run.is_dir():
        raise ConfigError(f"--curve takes a pretraining run's folder, not {args.checkpoint}")
    out = Path(args.out or run / "curve").resolve()
    check_out_is_this_runs(out, run)
    failed: set[int] = set()  # not tried again by this command
    said: set[int] = set()
    while True:
        if not run.is_dir():
            raise ConfigError(f"{run} no longer exists: the curve so far is in {out}")
        state = run_state(run)  # before the listing: a finished run's list is complete
        kept = kept_checkpoints(run)
        check_one_model(kept)
        if not kept and (not args.watch or state in ("done", "diverged")):
            raise ConfigError(f"{run} holds no kept checkpoint (encoder-epochN.pt): pretrain "
                              "with log.keep_every_epochs=N")  # fmt: skip
        points = {}
        for epoch, ckpt in with_control(kept).items():
            where = out / f"epoch{epoch}"
            plans = st.make_plans(tasks, ckpt, where, configs, smoke=args.smoke,
                                  scratch=out / "smoke_data")  # fmt: skip
            if epoch == 0:  # the control: the architecture of the first kept encoder, untrained
                for plan in plans.values():
                    plan.settings.append("encoder.random_init=true")
            points[epoch] = (ckpt, where, plans)
            if epoch in failed or all(st.stage_result(where / n) for n in plans):
                if epoch not in said and epoch not in failed:
                    print(f"== epoch {epoch}: evaluated already ({where}), skipped", flush=True)
                said.add(epoch)
                continue
            what = f"the untrained encoder of {ckpt.name}'s architecture" if epoch == 0 else ckpt
            print(f"== epoch {epoch}: {what}", flush=True)
            if st.evaluate_checkpoint(ckpt, where, plans, smoke=args.smoke) != 0:
                failed.add(epoch)
            said.add(epoch)
            if st.STOPPED:
                break
        write_curve(out, run, points, state)
        if st.STOPPED:
            print(f"crossmae transfer --curve: stopped by {signal.Signals(st.STOPPED[0]).name}; "
                  "the same command continues where it stopped", file=sys.stderr)  # fmt: skip
            return 1
        if not args.watch or state in ("done", "diverged"):
            break
        print(f"== the run is {state}; looking again in {args.poll} s (Ctrl-C stops)", flush=True)
        try:
            time.sleep(args.poll)
        except KeyboardInterrupt:
            print("crossmae transfer --curve: stopped while waiting", file=sys.stderr)
            return 130
    if state == "diverged":
        print(f"crossmae transfer --curve: the run diverged ({run / 'results.json'})",
              file=sys.stderr)  # fmt: skip
    if failed:
        print(f"crossmae transfer --curve: evaluations failed at epoch(s) "
              f"{' '.join(map(str, sorted(failed)))}", file=sys.stderr)  # fmt: skip
    return 1 if failed or state == "diverged" else 0


def with_control(kept: dict[int, Path]) -> dict[int, Path]:
    """The kept checkpoints, epoch 0 first: the untrained encoder of their architecture (its
    evaluation is the curve's starting point, the control every later point is read against)."""
    if not kept or 0 in kept:
        return kept
    return {0: next(iter(kept.values())), **kept}


def check_out_is_this_runs(out: Path, run: Path) -> None:
    """OUT holds one run's curve: the curve of another run there is refused before anything is
    evaluated (its epochN/ results would be taken for this run's)."""
    try:
        other = json.loads((out / "curve.json").read_text()).get("run")
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{out / 'curve.json'} is not a curve this command wrote ({e}): "
                          "give another OUT") from None  # fmt: skip
    if other is not None and Path(other).resolve() != run:
        raise ConfigError(f"{out} holds the curve of another run ({other}): one OUT is one "
                          f"run's curve; give {run.name}'s curve another OUT")  # fmt: skip


def curve_points(points: dict[int, tuple]) -> tuple[list[dict], dict[str, str]]:
    """One record per kept checkpoint (epoch, checkpoint, each stage's status, its headline
    numbers) and metric key -> label (the stages' table rows)."""
    labels: dict[str, str] = {}
    records = []
    for epoch, (ckpt, where, plans) in points.items():
        rec = {"epoch": epoch, "checkpoint": str(ckpt), "stages": {}, "metrics": {}}
        for name, plan in plans.items():
            result = st.stage_result(where / name)
            rec["stages"][name] = "done" if result is not None else "missing"
            metrics = {} if result is None else plan.task.transfer.numbers(result)
            metrics.pop("note", None)
            for label, keys in plan.task.transfer.columns:
                for key in keys:
                    labels.setdefault(key, f"{name}: {label}" if len(keys) == 1 else
                                      f"{name}: {label} ({key})")  # fmt: skip
                    rec["metrics"][key] = metrics.get(key)
        records.append(rec)
    return records, labels


def write_curve(out: Path, run: Path, points: dict[int, tuple], state: str) -> None:
    """OUT/curve.json, curve.md and curve.png (each metric against the pretraining epoch) from
    ``points``: epoch -> (checkpoint, its folder under OUT, its stages' plans)."""
    records, labels = curve_points(points)
    written = datetime.now(UTC).isoformat(timespec="seconds")
    summary = {"run": str(run), "run_state": state, "written": written, "metrics": labels,
               "points": records}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "curve.json", strict_json(summary, indent=1) + "\n")
    png = plot_curve(records, labels, out / "curve.png", title=f"{run.parent.name}/{run.name}")
    lines = [f"# Transfer curve of `{run}`", "",
             f"The run is {state}; {len(records)} kept checkpoint(s).", "",
             "| epoch | " + " | ".join(labels.values()) + " |",
             "|---" * (len(labels) + 1) + "|"]  # fmt: skip
    for rec in records:
        cells = [st.fmt(rec["metrics"].get(k)) for k in labels]
        epoch = f"{rec['epoch']} (untrained)" if rec["epoch"] == 0 else rec["epoch"]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    lines.append("")
    if png is not None:
        lines += [f"![each metric against the pretraining epoch]({png.name})", ""]
    lines += [f"Written {written}; the same in curve.json, each point's runs in epochN/.", ""]
    write_text_atomic(out / "curve.md", "\n".join(lines))
    print("\n".join(lines), flush=True)


def plot_curve(records: list[dict], labels: dict[str, str], path: Path, title: str) -> Path | None:
    """One line per metric against the epoch; None while no metric has a value."""
    series = {k: [(r["epoch"], r["metrics"][k]) for r in records if r["metrics"].get(k) is not None]
              for k in labels}  # fmt: skip
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    from ..visualize import _pyplot, save_figure_atomic

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, pts in series.items():
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", label=labels[key])
    ax.set_xlabel("pretraining epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("metric (top-1 %, AP or mIoU)")
    ax.set_title(f"transfer curve: {title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=110)
