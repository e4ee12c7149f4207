"""tools/transfer.sh (``crossmae transfer``): every stage on the shared data (--smoke), skipping
finished stages, resuming an unfinished one, refusing a folder of another checkpoint's results,
the Slurm launcher path, and its errors."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO

from crossmae.cli import main

SCRIPT = str(REPO / "tools" / "transfer.sh")
pytestmark = pytest.mark.slow  # every test runs (or shares) the end-to-end smoke transfer


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 2-step pretraining run of the default (laptop) CrossMAE on the built-in photos."""
    from crossmae.config import load_config
    from crossmae.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("pretrain")
    pretrain(load_config(PretrainConfig, [], [
        f"output_dir={out}", "train.max_steps=2", "train.batch_size=8", "log.vis_every_epochs=0",
        "log.tensorboard=false", "log.progress=false", "data.num_workers=0"]))  # fmt: skip
    return out / "checkpoint-last.pt"


def transfer(*args, env=None, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(
        ["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def smoke(shared_dir, pretrained, tmp_path_factory):
    """Every stage of ``transfer.sh --smoke`` on the pretraining checkpoint: (OUT, the run)."""
    out = tmp_path_factory.mktemp("smoke") / "transfer"
    res = transfer("--smoke", str(pretrained), str(out), env={"CROSSMAE_SHARED": str(shared_dir)})
    return out, res


def test_smoke_fills_every_stage_skips_done_ones_and_resumes(shared_dir, pretrained, smoke):
    out, res = smoke
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = json.loads((out / "results.json").read_text())
    assert table["checkpoint"] == str(pretrained)
    for stage in ("linprobe", "finetune", "det", "seg"):
        assert table["stages"][stage]["status"] == "done"
        assert (out / stage / "config.yaml").is_file()
    for key in ("linear_probe_top1", "finetune_top1", "miou"):
        assert 0.0 <= table[key] <= 100.0, key
    # two iterations leave every class score under ViTDet's 0.05 test threshold: no detection,
    # so AP is undefined (detectron2 reports NaN; the table null)
    for key in ("ap_box", "ap_mask"):
        assert table[key] is None or 0.0 <= table[key] <= 100.0, key
    md = (out / "results.md").read_text()
    assert "COCO AP box / AP mask" in md and md.count("| done |") == 4

    # a second call skips the finished stages; a stage without its final result (a run
    # stopped after its last checkpoint) resumes from that checkpoint
    (out / "seg" / "results.json").unlink()
    res = transfer("--smoke", str(pretrained), str(out), env={"CROSSMAE_SHARED": str(shared_dir)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in ("linprobe", "finetune", "det"):
        assert f"== {stage}: done already" in res.stdout
    assert "resumed from" in (out / "seg" / "log.txt").read_text()
    assert json.loads((out / "results.json").read_text())["stages"]["seg"]["status"] == "done"


def test_a_folder_of_another_checkpoints_results_is_refused(
    shared_dir, pretrained, smoke, tmp_path, monkeypatch, capsys
):
    """Run again into the same OUT with another checkpoint (or the same path rewritten): the
    stage's recorded checkpoint differs, so its results are not reused under the new name."""
    out, _ = smoke
    monkeypatch.setenv("CROSSMAE_SHARED", str(shared_dir))
    other = tmp_path / "other.pt"
    shutil.copy(pretrained, other)
    capsys.readouterr()
    assert main(["transfer", "--smoke", "--stages", "linprobe", str(other), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"holds a run of {pretrained}" in err and str(other) in err
    assert json.loads((out / "results.json").read_text())["checkpoint"] == str(pretrained)
    # other settings for the same checkpoint are refused the same way
    monkeypatch.setenv("LINPROBE_ARGS", "optim.blr=0.5")
    assert main(["transfer", "--smoke", "--stages", "linprobe", str(pretrained), str(out)]) == 2
    assert "optim.blr=0.5" in capsys.readouterr().err


def test_slurm_launcher_runs_a_stage_through_submitit(shared_dir, pretrained, tmp_path):
    out = tmp_path / "transfer"
    env = {
        "CROSSMAE_SHARED": str(shared_dir),
        "LAUNCHER": "slurm",
        "SLURM_ARGS": "--cluster local --gpus-per-node 0 --tasks-per-node 1 --timeout-min 10",
    }
    res = transfer("--smoke", "--stages", "linprobe", str(pretrained), str(out), env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "exit codes [0]" in res.stdout
    table = json.loads((out / "results.json").read_text())
    assert list(table["stages"]) == ["linprobe"] and "linear_probe_top1" in table


def test_errors_name_the_problem(pretrained, tmp_path, monkeypatch, capsys):
    res = transfer(str(tmp_path / "missing.pt"))  # through the script
    assert res.returncode == 2 and "missing.pt does not exist" in res.stderr

    def error(*argv: str, **env: str) -> str:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        assert main(["transfer", *argv]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    err = error(str(pretrained), str(tmp_path / "out"), IMAGENET="", COCO="", ADE20K="")
    assert "IMAGENET" in err and "ADE20K" in err
    err = error("--stages", "finetune", str(pretrained), str(tmp_path / "out"), ARCH="base",
                IMAGENET=str(tmp_path / "imagenet"))  # fmt: skip
    assert "imagenet/train does not exist" in err
    assert "unknown stage 'segm'" in error("--stages", "det segm", str(pretrained))
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    (tmp_path / "imagenet" / "val").mkdir()
    err = error("--stages", "linprobe", str(pretrained), str(tmp_path / "out"), NPROC="abc")
    assert "NPROC must be a number of processes, not 'abc'" in err


def refuse(token: str):
    raise ValueError(f"{token} is not JSON")


def strict(path) -> object:
    """A JSON file (or JSON-lines file) parsed as strict JSON: NaN / Infinity are errors."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line]
    return json.loads(text, parse_constant=refuse)


SILENCE = 30  # seconds a command may go without a line to its user (at the smoke sizes)


class Lines(logging.Handler):
    """When each of crossmae's log lines was written."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.times.append(time.monotonic())


@pytest.fixture
def lines():
    handler = Lines()
    logging.getLogger("crossmae").addHandler(handler)
    yield handler
    logging.getLogger("crossmae").removeHandler(handler)


def test_readme_commands_work_on_the_main_jobs_run_folder(
    shared_dir, pretrained, smoke, tmp_path, capsys, lines
):
    """The README's commands, as written, on the default pretraining run's folder (8-px patches,
    64 px): transfer --smoke (above: det and seg resample the patches to 16 px and say so), the
    quick frozen evaluation, the converters, psnr, the analyses, then evaluate and visualize on
    the smoke's detector and segmenter. Every JSON written is strict JSON, and no command goes
    more than ``SILENCE`` seconds without a line."""
    run, out = pretrained.parent, smoke[0]
    data = shared_dir / "data"
    for stage in ("det", "seg"):
        assert "patch kernel is resampled to 16 px" in (out / stage / "log.txt").read_text()
    md = (out / "results.md").read_text()
    assert "**Smoke run**" in md and json.loads((out / "results.json").read_text())["smoke"]

    def ok(*argv: str) -> str:
        capsys.readouterr()
        lines.times = [time.monotonic()]
        assert main(list(argv)) == 0, argv
        out = capsys.readouterr().out
        lines.times.append(time.monotonic())  # its output printed at the end counts as a line
        gap = max(b - a for a, b in itertools.pairwise(lines.times))
        assert gap <= SILENCE, f"crossmae {' '.join(argv[:2])}: {gap:.0f} s without a line"
        for line in out.splitlines():  # every JSON it prints is strict
            if line.startswith("{"):
                json.loads(line, parse_constant=refuse)
        return out

    cifar = out / "smoke_data" / "cls"
    ok("cls", "frozen", "--config", str(REPO / "configs/cls/frozen_cifar10_tiny.yaml"),
       f"encoder.checkpoint={run / 'encoder.pt'}", f"output_dir={tmp_path / 'frozen'}",
       f"data.train={cifar / 'train'}", f"data.val={cifar / 'val'}", "data.cache_dir=null",
       "probe.epochs=2", "probe.warmup_epochs=1", "control=true")  # fmt: skip
    log = (tmp_path / "frozen" / "log.txt").read_text()
    assert "per-class top-1" in log and "; untrained control: kNN " in log  # as the README shows
    frozen = json.loads((tmp_path / "frozen" / "results.json").read_text())["metrics"]
    assert frozen["gain"]["knn_top1"] == pytest.approx(
        frozen["knn_top1"] - frozen["control"]["knn_top1"])  # fmt: skip
    for kind in ("to-official", "to-mae", "to-timm", "to-mmseg"):
        ok("convert", kind, str(pretrained), str(tmp_path / f"{kind}.pth"))
    images = str(data / "imagenette" / "val")
    ok("psnr", str(pretrained), "--data", images, "--images", "4",
       "--out", str(tmp_path / "psnr.json"))  # fmt: skip
    figs = tmp_path / "figs"
    ok("analyze", "recon", "--crossmae", str(pretrained), "--images", images, "-n", "2",
       "--out", str(figs))  # fmt: skip
    ok("analyze", "blocks", "--crossmae", str(pretrained), "--images", images, "-n", "2",
       "--out", str(figs))  # fmt: skip
    ok("analyze", "iba", "--crossmae", str(pretrained), "--out", str(figs))

    coco = data / "coco128"
    small = out / "smoke_data" / "det" / "small.json"
    text = ok("det", "evaluate", str(out / "det" / "checkpoint-last.pt"), "--json", str(small),
              "--images", str(coco / "train2017"))  # fmt: skip
    assert "no detection scored above 0.05" in text or "Per-category bbox AP:" in text
    ok("det", "visualize", str(out / "det" / "checkpoint-last.pt"), "--json", str(small),
       "--images", str(coco / "train2017"), "--out", str(tmp_path / "det_png"), "-n", "2",
       "--score", "0")  # fmt: skip
    ade = f"data.root={data / 'ade20k_samples'}"
    text = ok("seg", "evaluate", str(out / "seg" / "checkpoint-last.pt"), ade)
    assert "per class results:" in text and "| wall " in text and "Summary:" in text
    ok("seg", "visualize", str(out / "seg" / "checkpoint-last.pt"), ade, "--out",
       str(tmp_path / "seg_png"), "-n", "2")  # fmt: skip
    for folder in ("det_png", "seg_png"):
        pngs = sorted((tmp_path / folder).glob("*.png"))
        assert len(pngs) == 2 and all(p.stat().st_size > 5000 for p in pngs), folder
    for name in ("reconstructions", "decoder_blocks", "iba_weights"):
        assert (figs / f"{name}.png").stat().st_size > 5000
    for root in (run, out, tmp_path):
        for path in [*root.rglob("*.json"), *root.rglob("*.jsonl")]:
            strict(path)
