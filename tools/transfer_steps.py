"""The Python steps of ``tools/transfer.sh``: the encoder size of a checkpoint, the smoke-test
data, whether a stage has finished, and the results table.

    python tools/transfer_steps.py arch CHECKPOINT            # -> small | base | large | huge
    python tools/transfer_steps.py smoke-data SHARED DEST     # tiny splits of ../shared/data
    python tools/transfer_steps.py done STAGE_DIR             # exit 0 if its final result exists
    python tools/transfer_steps.py table OUT CHECKPOINT STAGE...  # OUT/results.{md,json}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path

ARCH_BY_WIDTH = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
STAGES = ("linprobe", "finetune", "det", "seg")


def cmd_arch(args) -> int:
    """Width of the cls token, in any checkpoint format (ours, encoder export, official)."""
    from crossmae.checkpoint import read_torch_file

    try:
        ckpt = read_torch_file(args.checkpoint)
    except (OSError, ValueError) as e:
        print(f"transfer.sh: {e}", file=sys.stderr)
        return 2
    if not isinstance(ckpt, dict):
        print(f"transfer.sh: {args.checkpoint} holds no state dict", file=sys.stderr)
        return 2
    tensors = ckpt.get("model") or ckpt.get("encoder") or ckpt
    width = next((v.shape[-1] for k, v in tensors.items() if k.endswith("cls_token")), None)
    if width not in ARCH_BY_WIDTH:
        print(f"no config size for an encoder of width {width}; set ARCH", file=sys.stderr)
        return 2
    print(ARCH_BY_WIDTH[width])
    return 0


def cmd_smoke_data(args) -> int:
    """A 3-class CIFAR-10 ImageFolder (links to the shared files), the first 4 coco128 images."""
    from det.data import coco_subset

    shared, dest = Path(args.shared), Path(args.dest)
    cifar = shared / "data" / "cifar10"
    for split, src, n in (("train", "train", 8), ("val", "test", 4)):
        for cls_dir in sorted((cifar / src).iterdir())[:3]:
            out = dest / "cls" / split / cls_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                if not (out / f.name).exists():
                    (out / f.name).symlink_to(f.resolve())
    (dest / "det").mkdir(parents=True, exist_ok=True)
    coco = shared / "data" / "coco128" / "annotations" / "instances_train2017.json"
    coco_subset(coco, dest / "det" / "small.json", 4)
    return 0


def stage_result(stage_dir: Path) -> dict | None:
    """The stage's final ``results.json``, or None while it is missing or from a stopped run."""
    path = stage_dir / "results.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return None if result.get("interrupted") else result


def cmd_done(args) -> int:
    return 0 if stage_result(Path(args.stage_dir)) is not None else 1


def headline(stage: str, result: dict) -> dict[str, float]:
    """The numbers the paper reports for a stage: top-1 of the last epoch (the best epoch's is
    kept in the JSON), box / mask AP, single-scale mIoU."""
    if stage in ("linprobe", "finetune"):
        key = "linear_probe_top1" if stage == "linprobe" else "finetune_top1"
        return {key: result["last"]["top1"], f"{key}_best": result["best"]["top1"]}
    metrics = result["metrics"]
    if stage == "det":  # NaN (no detection at all, as detectron2 reports it) -> null
        ap = {"ap_box": metrics["bbox"]["AP"], "ap_mask": metrics["segm"]["AP"]}
        return {k: None if math.isnan(v) else v for k, v in ap.items()}
    return {"miou": metrics["mIoU"], "macc": metrics["mAcc"], "aacc": metrics["aAcc"]}


def config_of(stage_dir: Path) -> str | None:
    path = stage_dir / "config.yaml"
    return str(path) if path.is_file() else None


def fmt(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def cmd_table(args) -> int:
    from crossmae.checkpoint import write_text_atomic

    out = Path(args.out)
    rows = {}
    for stage in args.stages:
        stage_dir = out / stage
        result = stage_result(stage_dir)
        rows[stage] = {
            "status": "done" if result is not None else "missing",
            "output_dir": str(stage_dir),
            "config": config_of(stage_dir),
            "metrics": headline(stage, result) if result is not None else {},
        }
    summary = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "stages": rows,
        **{k: v for r in rows.values() for k, v in r["metrics"].items()},
    }
    write_text_atomic(out / "results.json", json.dumps(summary, indent=1) + "\n")
    names = {
        "linprobe": ("linear probe top-1", "linear_probe_top1"),
        "finetune": ("finetune top-1", "finetune_top1"),
        "det": ("COCO AP box / AP mask", "ap_box", "ap_mask"),
        "seg": ("ADE20K mIoU", "miou"),
    }
    lines = [
        f"# Transfer results of `{summary['checkpoint']}`",
        "",
        "| stage | metric | value | config | status |",
        "|---|---|---|---|---|",
    ]
    for stage, row in rows.items():
        label, *keys = names[stage]
        value = " / ".join(fmt(row["metrics"].get(k)) for k in keys)
        lines.append(f"| {stage} | {label} | {value} | {row['config'] or '—'} | {row['status']} |")
    lines += ["", f"Written {summary['written']}; the same in results.json.", ""]
    write_text_atomic(out / "results.md", "\n".join(lines))
    print("\n".join(lines))
    return 0 if all(r["status"] == "done" for r in rows.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("arch", help="config size of a checkpoint's encoder")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_arch)
    p = sub.add_parser("smoke-data", help="tiny splits of the shared data for --smoke")
    p.add_argument("shared")
    p.add_argument("dest")
    p.set_defaults(func=cmd_smoke_data)
    p = sub.add_parser("done", help="exit 0 if the stage's final result exists")
    p.add_argument("stage_dir")
    p.set_defaults(func=cmd_done)
    p = sub.add_parser("table", help="results table of the stages")
    p.add_argument("out")
    p.add_argument("checkpoint")
    p.add_argument("stages", nargs="+", choices=STAGES)
    p.set_defaults(func=cmd_table)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
