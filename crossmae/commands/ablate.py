"""``crossmae ablate``: the paper's main comparisons in miniature, one command, one table.

Pretrains each variant with each seed on one labelled image folder with one budget, evaluates
every encoder the same way on a held-out split (kNN and the fast linear probe of ``cls frozen``,
masked-patch PSNR), and writes ``OUT/ablation.md`` and ``OUT/ablation.json`` (per variant: decoder
GMACs per image, img/s on this machine, final loss, PSNR, kNN top-1 and probe top-1, mean and
spread over the seeds), and ``OUT/ablation.png`` (accuracy against decoder FLOPs, the axes of the
paper's Fig. 7). A control row evaluates the same encoder architecture untrained (one random
init per seed) the same way; each variant's gain over it is in the table. The paper's claims
are read only for variants that beat the control beyond the spreads ("not learned at this
budget" otherwise), and a difference between two variants is called one only when it exceeds
their spreads added. A finished run is not run again: the command continues where it stopped.

    crossmae ablate --config configs/ablate/cifar10_cpu.yaml \\
        --train ../shared/data/cifar10/train --val ../shared/data/cifar10/test --out runs/ablation

``--transfer seg finetune`` also trains those transfer stages on every encoder, the control's
included, each with its CPU-sized config on the shared data (``TransferStage.cpu_config``:
``configs/seg/upernet_camvid_small.yaml``, ``configs/cls/finetune_cifar10_tiny.yaml``,
``configs/det/mask_rcnn_coco128_small.yaml``), and reads the claims on their metrics too (the
paper's COCO and ADE20K comparisons in miniature).

``key=value`` settings apply to every pretraining run (``crossmae pretrain``'s schema); those
starting with ``frozen.`` to the evaluation (the transfer stage that scores encoders,
``TransferStage.scores_encoders``: ``cls frozen``'s, e.g. ``frozen.probe.epochs=20``),
and those starting with a transfer stage's name to that stage (``seg.train.steps=400``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
from pathlib import Path

from ..checks import int_at_least
from ..models import MAE
from ..task import register_command

log = logging.getLogger("crossmae")

# variant -> model settings on top of the shared ones; "{kind}" and "{arch}" fill the model name
VARIANTS: dict[str, dict] = {
    "mae": {"model.name": "mae_vit_{arch}", "model.decoder_depth": 8, "model.pred_ratio": None},
    "mae_iba": {"model.name": "mae_vit_{arch}", "model.decoder_depth": 8,
                "model.pred_ratio": None, "model.kwargs.weight_fm": True},
    "crossmae_g0.75": {"model.name": "crossmae_vit_{arch}", "model.decoder_depth": 12,
                       "model.pred_ratio": 0.75},
    "crossmae_g0.25": {"model.name": "crossmae_vit_{arch}", "model.decoder_depth": 12,
                       "model.pred_ratio": 0.25},
    "crossmae_g0.25_last_block": {"model.name": "crossmae_vit_{arch}",
                                  "model.decoder_depth": 12, "model.pred_ratio": 0.25,
                                  "model.kwargs.weight_fm": False},
    "crossmae_g0.25_depth4": {"model.name": "crossmae_vit_{arch}", "model.decoder_depth": 4,
                              "model.pred_ratio": 0.25},
}  # fmt: skip

# the paper's claims as (claim, variant a, variant b): a is expected to be at least as good as b
CLAIMS = [
    ("CrossMAE matches MAE at a lower decoder cost (Table 1)", "crossmae_g0.25", "mae"),
    ("predicting a quarter of the masked patches is as good as all of them (Table 3)",
     "crossmae_g0.25", "crossmae_g0.75"),
    ("inter-block attention beats the last encoder block alone (Table 3d)", "crossmae_g0.25",
     "crossmae_g0.25_last_block"),
    ("a deeper CrossMAE decoder helps little (Table 3)", "crossmae_g0.25",
     "crossmae_g0.25_depth4"),
    ("inter-block attention also helps MAE (Table 7)", "mae_iba", "mae"),
]  # fmt: skip

METRICS = ("decoder_gmacs", "img_per_s", "final_loss", "psnr", "knn_top1", "probe_top1")
ACCURACY = ("knn_top1", "probe_top1")
CONTROL = "control (untrained)"  # the same encoder, random init, evaluated the same way
NOT_LEARNED = "not learned at this budget"


def settings_of(variant: str, arch: str) -> list[str]:
    out = []
    for key, value in VARIANTS[variant].items():
        value = "null" if value is None else value
        out.append(f"{key}={str(value).format(arch=arch)}")
    return out


def transfer_tasks(names: list[str]) -> dict[str, type]:
    """The transfer stages ``--transfer`` names (those with a CPU config)."""
    from ..config import ConfigError
    from ..task import transfer_stages

    known = {t.transfer.name: t for t in transfer_stages() if t.transfer.cpu_config}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--transfer: unknown stage(s) {unknown}; choose from {sorted(known)}")
    return {n: known[n] for n in dict.fromkeys(names)}


def transfer_metric(task) -> str:
    """The number a transfer stage is compared by: its results table's first key."""
    return task.transfer.columns[0][1][0]


def transfer_configs(args, encoder: list[str], folder: Path, seed: int) -> dict:
    """Each ``--transfer`` stage's config on one encoder (``encoder``: its ``encoder.*``
    settings), complete, its run in ``folder/transfer/STAGE``."""
    from ..config import load_config
    from .stages import REPO

    return {
        name: load_config(
            task.schema,
            [args.transfer_files.get(name, REPO / task.transfer.cpu_config)],
            [
                *encoder,
                f"output_dir={folder / 'transfer' / name}",
                f"train.seed={seed}",
                "log.progress=false",
                "log.tensorboard=false",
                *args.stage_settings[name],
            ],
            complete=True,
        )  # fmt: skip
        for name, task in args.transfer.items()
    }


class Tally:
    """Where ``ablate`` stands: "run k of N" before each (a variant and seed: pretraining,
    evaluation, transfer stages; or a control seed), a finished one said and skipped, and an
    ETA from the runs this command has trained so far."""

    def __init__(self, total: int):
        self.total, self.k, self.trained, self.seconds = total, 0, 0, 0.0

    @contextlib.contextmanager
    def run(self, what: str, finished: bool):
        import time

        from ..progress import duration

        self.k += 1
        if finished:
            log.info("ablate: run %d of %d, %s: finished earlier, read from its folder", self.k,
                     self.total, what)  # fmt: skip
            yield
            return
        left = self.total - self.k + 1
        eta = (f", about {duration(self.seconds / self.trained * left)} left for the {left} "
               "runs to go" if self.trained else "")  # fmt: skip
        log.info("ablate: run %d of %d, %s%s", self.k, self.total, what, eta)
        t0 = time.perf_counter()
        yield
        self.trained, self.seconds = self.trained + 1, self.seconds + time.perf_counter() - t0


def finished(folder: Path, stages) -> bool:
    """Whether a run's pretraining / evaluation and every transfer stage have their results."""
    return all((f / "ablate.json").is_file()
               for f in (folder, *(folder / "transfer" / n for n in stages)))  # fmt: skip


def run_transfers(args, configs: dict) -> dict[str, float | None]:
    """Train each transfer stage on its encoder (or continue it): its metric by name; cached
    in ``ablate.json`` beside each run."""
    from ..checkpoint import write_text_atomic
    from ..runner import run_task

    out = {}
    for name, cfg in configs.items():
        task, done = args.transfer[name], Path(cfg.output_dir) / "ablate.json"
        key = transfer_metric(task)
        if not done.is_file():
            log.info("ablate: %s on %s", name, cfg.encoder.checkpoint)
            result = run_task(task(cfg), cfg, "auto")
            if result["interrupted"]:
                raise SystemExit(1)
            write_text_atomic(done, json.dumps({key: task.transfer.numbers(result)[key]}) + "\n")
        out[key] = json.loads(done.read_text())[key]
    return out


def run_configs(args, variant: str, seed: int, shared: list[str], frozen: list[str]) -> tuple:
    """The pretraining config of one variant and seed, its evaluation's (the stage that scores
    encoders, ``cls frozen``) and its transfer stages', all complete: a wrong setting fails here,
    before any run starts."""
    from ..config import load_config
    from ..pretrain import PretrainTask
    from ..task import encoder_scorer

    run = Path(args.out) / variant / f"seed{seed}"
    pretrain = load_config(PretrainTask.schema, args.config, [
        f"data.path={args.train}", f"output_dir={run}", f"train.seed={seed}",
        "log.progress=false", "log.tensorboard=false", *shared,
        *settings_of(variant, args.arch)], complete=True)  # fmt: skip
    scorer = encoder_scorer()
    evaluation = load_config(scorer.schema, [], [
        *scorer.transfer.scores_encoders.settings(run / "encoder.pt", args.train, args.val,
                                                  pretrain.model.img_size,
                                                  pretrain.data.num_workers),
        *frozen], complete=True)  # fmt: skip
    transfers = transfer_configs(args, [f"encoder.checkpoint={run / 'encoder.pt'}"], run, seed)
    return pretrain, evaluation, transfers


def score_encoder(cfg) -> dict[str, float]:
    """kNN and probe top-1 of one encoder: a run of the stage that scores encoders."""
    from ..runner import run_task
    from ..task import encoder_scorer

    scorer = encoder_scorer()
    return scorer.transfer.scores_encoders.scores(run_task(scorer(cfg), cfg)["metrics"])


def run_one(args, variant: str, seed: int, cfg, evaluation, transfers) -> dict:
    """Pretrain (or continue) one variant with one seed, then evaluate it; cached in
    ``ablate.json`` beside the run."""
    import torch

    from ..analysis import flop_counts
    from ..checkpoint import PRETRAIN_FORMAT, load_checkpoint, write_text_atomic
    from ..models.pretrained import model_from_checkpoint
    from ..pretrain import PretrainTask
    from ..reconstruction import folder_reconstruction_metrics
    from ..runner import run_task

    run = Path(cfg.output_dir)
    done = run / "ablate.json"
    if done.is_file():
        return json.loads(done.read_text()) | run_transfers(args, transfers)
    log.info("ablate: %s seed %d -> %s", variant, seed, run)
    summary = run_task(PretrainTask(cfg), cfg, "auto")
    if summary["interrupted"]:
        raise SystemExit(1)
    model = model_from_checkpoint(load_checkpoint(run / "checkpoint-last.pt",
                                                  expect=PRETRAIN_FORMAT)).eval()  # fmt: skip
    acc = score_encoder(evaluation)
    rec = folder_reconstruction_metrics(model, args.val, images=args.psnr_images, seed=0)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    speeds = [r["img_per_s"] for r in rows if "img_per_s" in r]
    speeds = speeds[1:] if len(speeds) > 1 else speeds  # the first record holds the warm-up
    result = {
        "variant": variant, "kind": model.kind, "seed": seed, "steps": summary["step"],
        "decoder_gmacs": flop_counts(model)["decoder"],
        "img_per_s": statistics.fmean(speeds), "final_loss": summary["final_loss"],
        "psnr": rec["psnr"], **acc,
        "settings": settings_of(variant, args.arch), "threads": torch.get_num_threads(),
    }  # fmt: skip
    write_text_atomic(done, json.dumps(result, indent=1) + "\n")
    return result | run_transfers(args, transfers)


def run_control(args, seed: int, pretrain_cfg, evaluation) -> dict:
    """The control of one seed: the pretraining runs' encoder architecture with a random init
    (seeded), evaluated as they are (kNN, probe, PSNR of the untrained model, the transfer
    stages); cached in ``OUT/control/seedN/``."""
    import torch
    from omegaconf import OmegaConf

    from ..checkpoint import PRETRAIN_FORMAT, load_checkpoint, write_text_atomic
    from ..models import create_model
    from ..reconstruction import folder_reconstruction_metrics

    folder = Path(args.out) / "control" / f"seed{seed}"
    done = folder / "ablate.json"
    untrained = ["encoder.random_init=true", f"encoder.seed={seed}"]
    checkpoint = [f"encoder.checkpoint={Path(pretrain_cfg.output_dir) / 'encoder.pt'}"]
    controls = transfer_configs(args, [*checkpoint, *untrained], folder, seed)
    if done.is_file():
        return json.loads(done.read_text()) | run_transfers(args, controls)
    log.info("ablate: control (untrained encoder) seed %d", seed)
    cfg = OmegaConf.merge(evaluation, {"encoder": {"random_init": True, "seed": seed}})
    acc = score_encoder(cfg)
    ckpt = load_checkpoint(Path(pretrain_cfg.output_dir) / "checkpoint-last.pt",
                           expect=PRETRAIN_FORMAT)  # fmt: skip
    torch.manual_seed(seed)
    model = create_model(ckpt["model_name"], **ckpt["model_config"]).eval()
    rec = folder_reconstruction_metrics(model, args.val, images=args.psnr_images, seed=0)
    result = {"variant": CONTROL, "kind": None, "seed": seed, "steps": 0, "decoder_gmacs": None,
              "img_per_s": None, "final_loss": None, "psnr": rec["psnr"],
              **acc, "settings": untrained}  # fmt: skip
    done.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(done, json.dumps(result, indent=1) + "\n")
    return result | run_transfers(args, controls)


def aggregate(results: list[dict], accuracy: tuple[str, ...] = ACCURACY) -> dict[str, dict]:
    """Per variant: each metric's mean and spread (half the range over the seeds; None where it
    does not apply, as the control's decoder cost); with a control row, each variant's ``gain``
    over it in each ``accuracy`` metric (the difference of the means; its spread, the two
    spreads added) and whether it ``learned`` (a gain beyond that spread)."""
    metrics = (*METRICS, *(m for m in accuracy if m not in METRICS))
    table = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        rows = [r for r in results if r["variant"] == variant]
        table[variant] = {"seeds": len(rows), "kind": rows[0].get("kind")}
        for m in metrics:
            values = [r[m] for r in rows if r.get(m) is not None]
            table[variant][m] = (
                {"mean": statistics.fmean(values), "spread": (max(values) - min(values)) / 2}
                if values
                else None
            )
    control = table.get(CONTROL)
    for name, t in table.items():
        if control is None or name == CONTROL:
            continue
        t["gain"] = {}
        for m in accuracy:
            if t[m] is None or control[m] is None:
                continue
            gain = t[m]["mean"] - control[m]["mean"]
            spread = t[m]["spread"] + control[m]["spread"]
            t["gain"][m] = {"mean": gain, "spread": spread, "learned": gain > spread}
    return table


def comparisons(table: dict[str, dict], accuracy: tuple[str, ...] = ACCURACY) -> list[dict]:
    """Each claim whose two variants were run: the difference of each ``accuracy`` metric,
    called a difference only when it exceeds the two variants' spreads added, and read at all
    only when both variants beat the control beyond the spreads (``NOT_LEARNED`` otherwise; a
    table without a control row is read as it is)."""
    out = []
    for claim, a, b in CLAIMS:
        if a not in table or b not in table:
            continue
        row = {"claim": claim, "a": a, "b": b}
        for m in accuracy:
            if table[a][m] is None or table[b][m] is None:
                continue
            diff = table[a][m]["mean"] - table[b][m]["mean"]
            noise = table[a][m]["spread"] + table[b][m]["spread"]
            learned = all(table[v].get("gain", {}).get(m, {"learned": True})["learned"]
                          for v in (a, b))  # fmt: skip
            if not learned:
                verdict = NOT_LEARNED
            elif abs(diff) <= noise:
                verdict = "no difference"
            else:
                verdict = "a better" if diff > 0 else "b better"
            row[m] = {"difference": diff, "noise": noise, "verdict": verdict}
        out.append(row)
    return out


def markdown(table: dict[str, dict], claims: list[dict], header: str,
             transfer: dict[str, str] | None = None) -> str:  # fmt: skip
    """The table, the transfer table (``transfer``: metric -> its label) and the claims."""
    transfer = transfer or {}

    def cell(v: dict | None, digits: int) -> str:
        return "-" if v is None else f"{v['mean']:.{digits}f} ± {v['spread']:.{digits}f}"

    def gain(t: dict, m: str) -> str:
        g = t.get("gain", {}).get(m)
        if g is None:
            return "-"
        return f"{g['mean']:+.2f} ± {g['spread']:.2f}{'' if g['learned'] else ' (not beyond)'}"

    lines = [header, "",
             "| variant | seeds | decoder GMACs / image | img/s | final loss | PSNR (dB) "
             "| kNN top-1 | probe top-1 | kNN gain over control | probe gain over control |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, t in table.items():
        gmacs = "-" if t["decoder_gmacs"] is None else f"{t['decoder_gmacs']['mean']:.3f}"
        speed = "-" if t["img_per_s"] is None else f"{t['img_per_s']['mean']:.0f}"
        lines.append(f"| {name} | {t['seeds']} | {gmacs} | {speed} | "
                     f"{cell(t['final_loss'], 3)} | {cell(t['psnr'], 2)} | "
                     f"{cell(t['knn_top1'], 2)} | {cell(t['probe_top1'], 2)} | "
                     f"{gain(t, 'knn_top1')} | {gain(t, 'probe_top1')} |")  # fmt: skip
    if transfer:
        lines += ["", "Transfer: each encoder, the control's included, trained on each stage "
                  "(its CPU config, the same seed as the encoder's run).", "",
                  "| variant | seeds | " + " | ".join(f"{label} | gain over control"
                                                    for label in transfer.values()) + " |",
                  "|---|---|" + "---|---|" * len(transfer)]  # fmt: skip
        for name, t in table.items():
            cells = [f"{cell(t[m], 2)} | {gain(t, m)}" for m in transfer]
            lines.append(f"| {name} | {t['seeds']} | " + " | ".join(cells) + " |")
    labels = {"knn_top1": "kNN", "probe_top1": "probe", **transfer}
    lines += ["", "Mean ± spread (half the range over the seeds). The control is the same encoder "
              "untrained (one random init per seed), evaluated the same way; a gain's spread is "
              "the variant's and the control's added. A claim is read only where both of its "
              f"variants beat the control beyond that spread (\"{NOT_LEARNED}\" otherwise); a "
              "difference is called one only when it exceeds the two variants' spreads "
              "added."]  # fmt: skip
    if not claims:  # no claim has both of its variants in this table
        return "\n".join(lines) + "\n"
    lines += ["", "| claim (a vs b) | " + " | ".join(f"{label}: a - b" for label in
                                                 labels.values()) + " |",
              "|---|" + "---|" * len(labels)]  # fmt: skip
    for c in claims:
        cells = [f"{c[m]['difference']:+.2f} ({c[m]['verdict']})" if m in c else "-"
                 for m in labels]  # fmt: skip
        lines.append(f"| {c['claim']} ({c['a']} vs {c['b']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict], path: Path) -> None:
    from ..visualize import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    control = table.get(CONTROL)
    if control is not None:
        for m, style in (("knn_top1", "--"), ("probe_top1", ":")):
            ax.axhline(
                control[m]["mean"],
                color="gray",
                ls=style,
                lw=1,
                label=f"untrained encoder ({'kNN' if m == 'knn_top1' else 'probe'})",
            )
        ax.legend(fontsize=7)
    rows = {n: t for n, t in table.items() if t["decoder_gmacs"] is not None}
    xs = [t["decoder_gmacs"]["mean"] for t in rows.values()]
    near = 0.06 * (max(xs) - min(xs) or 1.0)  # labels of points this close are stacked
    placed: list[float] = []
    for name, t in rows.items():
        x = t["decoder_gmacs"]["mean"]
        for m, marker in (("knn_top1", "o"), ("probe_top1", "s")):
            ax.errorbar(x, t[m]["mean"], yerr=t[m]["spread"], fmt=marker,
                        color="C3" if t["kind"] == MAE.kind else "C0", capsize=3)  # fmt: skip
        below = sum(abs(x - p) < near for p in placed)
        placed.append(x)
        ax.annotate(name, (x, t["knn_top1"]["mean"]), fontsize=7, xytext=(6, -4 - 10 * below),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("decoder GMACs per image (forward)")
    ax.set_ylabel("top-1 (%): kNN (circles), linear probe (squares)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_ablate(args) -> int:
    from ..checkpoint import write_text_atomic
    from ..config import ConfigError
    from ..task import encoder_scorer

    # settings written after --variants or --transfer are settings, not names
    for names in ("variants", "transfer"):
        args.overrides += [v for v in getattr(args, names) if "=" in v]
        setattr(args, names, [v for v in getattr(args, names) if "=" not in v])
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    args.transfer = transfer_tasks(args.transfer)
    args.transfer_files = {}
    for item in args.transfer_config:
        stage, _, file = item.partition("=")
        if stage not in args.transfer or not file:
            raise ConfigError(f"--transfer-config {item}: expected STAGE=FILE with STAGE one of "
                              f"--transfer's {list(args.transfer)}")  # fmt: skip
        if not Path(file).is_file():
            raise ConfigError(f"--transfer-config {item}: no such file")
        args.transfer_files[stage] = Path(file)
    scorer = encoder_scorer()
    stages = (scorer.transfer.name, *args.transfer)

    def settings_of_stage(name: str) -> list[str]:
        return [o.removeprefix(f"{name}.") for o in args.overrides if o.startswith(f"{name}.")]

    frozen = settings_of_stage(scorer.transfer.name)
    args.stage_settings = {name: settings_of_stage(name) for name in args.transfer}
    shared = [o for o in args.overrides if not o.startswith(tuple(f"{n}." for n in stages))]
    out = Path(args.out)
    # every run's settings and the splits, checked before the first run starts
    runs = [(v, s, *run_configs(args, v, s, shared, frozen))
            for v in args.variants for s in range(args.seeds)]  # fmt: skip
    scorer(runs[0][3]).open_data()  # train / val: class folders, the same classes
    from ..hooks import resume_hint
    from ..runner import setup_logging

    setup_logging(None, 0)  # its own lines before the first run's (which sets the same up)
    tally = Tally(len(runs) + args.seeds)
    results = []
    with resume_hint("the same crossmae ablate command (it continues where it stopped)"):
        for run in runs:
            folder = Path(run[2].output_dir)
            with tally.run(f"{run[0]} seed {run[1]}", finished(folder, args.transfer)):
                results.append(run_one(args, *run))
        first = {s: (p, e) for _, s, p, e, _ in reversed(runs)}  # each seed's first run
        for s in range(args.seeds):
            folder = out / "control" / f"seed{s}"
            with tally.run(f"control seed {s}", finished(folder, args.transfer)):
                results.append(run_control(args, s, *first[s]))
    transfer = {transfer_metric(t): f"{name} {transfer_metric(t)}"
                for name, t in args.transfer.items()}  # fmt: skip
    accuracy = (*ACCURACY, *transfer)
    table = aggregate(results, accuracy)
    claims = comparisons(table, accuracy)
    given = [*(f"--config {c}" for c in args.config),
             *([f"--transfer {' '.join(args.transfer)}"] if args.transfer else []),
             *(f"--transfer-config {c}" for c in args.transfer_config),
             *args.overrides]  # fmt: skip
    header = (f"Ablation on {args.train} (evaluated on {args.val}), {args.seeds} seed(s), "
              f"settings: {' '.join(given) or 'defaults'}")  # fmt: skip
    write_text_atomic(out / "ablation.md", markdown(table, claims, header, transfer))
    write_text_atomic(out / "ablation.json", json.dumps(
        {"table": table, "comparisons": claims, "runs": results}, indent=1) + "\n")  # fmt: skip
    plot(table, out / "ablation.png")
    print((out / "ablation.md").read_text())
    return 0


@register_command(("ablate",), help="the paper's comparisons in miniature: one table",
                  description=__doc__)  # fmt: skip
def _ablate_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="labelled ImageFolder: pretraining and probes")
    p.add_argument("--val", required=True, help="held-out ImageFolder with the same classes")
    p.add_argument("--out", required=True, help="folder for the runs and the table")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT",
                   help=f"any of {', '.join(VARIANTS)} (default: all)")  # fmt: skip
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="pretraining config file(s) of every run, e.g. configs/ablate/"
                   "cifar10_cpu.yaml (repeatable; key=value settings go over them)")  # fmt: skip
    p.add_argument(
        "--seeds", type=int_at_least(1), default=3, help="runs per variant (seeds 0, 1, ...)"
    )
    p.add_argument("--transfer", nargs="+", default=[], metavar="STAGE",
                   help="also train these transfer stages on every encoder (seg, finetune, det) "
                   "with their CPU configs; STAGE.KEY=VALUE sets them")  # fmt: skip
    p.add_argument("--transfer-config", action="append", default=[], metavar="STAGE=FILE",
                   help="a transfer stage's config file instead of its CPU config "
                   "(repeatable)")  # fmt: skip
    p.add_argument("--arch", default="tiny_patch8", help="model size: {kind}_vit_ARCH")
    p.add_argument(
        "--psnr-images", type=int_at_least(1), default=500, help="val images for the PSNR"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="pretraining settings; frozen.KEY=VALUE for the evaluation, "
                   "STAGE.KEY=VALUE for a transfer stage")  # fmt: skip
    p.set_defaults(func=cmd_ablate)
