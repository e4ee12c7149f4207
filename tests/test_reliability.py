"""Reliability: no lost work, no silently wrong run, one-line errors. One test (or table row) per
case of the list these were found in: concurrent runs, a failing final evaluation, resuming a
finished or a changed run, nonsense settings, non-finite losses, 16-bit images, bad
labels, unreadable files, and the messages a user reads. Ctrl-C is
tests/test_train.py::test_a_stop_signal_to_the_process_group_leaves_a_usable_checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf
from PIL import Image
from test_train import TINY

from crossmae.checkpoint import LAST, load_checkpoint, save_atomic
from crossmae.cli import main
from crossmae.config import ConfigError, load_config
from crossmae.evaluation import Evaluation
from crossmae.pretrain import PretrainConfig, pretrain


def tiny(tmp_path: Path, *extra: str):
    return load_config(PretrainConfig, [], [*TINY, f"output_dir={tmp_path}", *extra])


# ----------------------------------------------------------------------------- work lost
def test_1_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    """A live process's lock refuses the folder (nothing written); a dead one's is taken over;
    a finished run leaves no lock."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / "run.lock").write_text(f"{socket.gethostname()} {holder.pid}\n")
        with pytest.raises(FileExistsError, match=f"in use by process {holder.pid}"):
            pretrain(tiny(run, "train.epochs=1"))
        assert sorted(p.name for p in run.iterdir()) == ["run.lock"]
    finally:
        holder.kill()
        holder.wait()
    summary = pretrain(tiny(run, "train.epochs=1"))  # the lock of an ended process: taken over
    assert summary["step"] == 4 and not (run / "run.lock").exists()


def test_2_the_training_is_saved_before_a_final_evaluation_that_fails(tmp_path):
    from conftest import tiny_encoder_export
    from pixel_task import PixelTask

    from crossmae.runner import run_task

    class Failing(PixelTask):
        def evaluation(self):
            def fail(step):
                raise RuntimeError("the evaluation found a problem")

            return Evaluation(fail)

    tiny_encoder_export(tmp_path / "enc.pt", embed_dim=32, depth=2, num_heads=2)
    common = [f"encoder.checkpoint={tmp_path / 'enc.pt'}"]
    cfg = load_config(Failing.schema, [], [*common, f"output_dir={tmp_path / 'run'}"])
    result = run_task(Failing(cfg), cfg)  # reported, and the run ends as a finished one
    assert result["step"] == 4 and not result["interrupted"] and result["metrics"] is None
    assert load_checkpoint(tmp_path / "run" / LAST)["step"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["evaluation_error"] for r in rows if "evaluation_error" in r] == [
        "the evaluation: RuntimeError: the evaluation found a problem"]  # fmt: skip
    cfg = load_config(Failing.schema, [], [*common, f"output_dir={tmp_path / 'stop'}",
                                           "train.stop_on_eval_error=true"])  # fmt: skip
    with pytest.raises(RuntimeError, match="found a problem"):
        run_task(Failing(cfg), cfg)
    assert load_checkpoint(tmp_path / "stop" / LAST)["step"] == 4


@pytest.mark.parametrize(
    "schema, settings, message",
    [("seg", ["eval.mode=sliding"], r"eval.mode=sliding: must be one of \['slide', 'whole'\]"),
     ("det", ["eval.precision=fp8"], "eval.precision=fp8: must be one of")],
)  # fmt: skip
def test_2_settings_used_only_at_the_end_are_checked_when_the_config_loads(
    schema, settings, message
):
    from det.config import DetConfig
    from seg.config import SegConfig

    with pytest.raises(ConfigError, match=message):
        load_config({"seg": SegConfig, "det": DetConfig}[schema], [], settings)


def test_2_det_checks_every_image_its_annotations_name_before_training(shared_dir, tmp_path):
    from det.data import AnnotationError, CocoInstances

    coco = shared_dir / "data" / "coco128"
    data = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    data["images"][3]["file_name"] = "missing.jpg"
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(FileNotFoundError, match=r"names .*missing.jpg, which does not exist"):
        CocoInstances(tmp_path / "a.json", coco / "train2017", train=False)
    del data["images"][3]["file_name"]
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match="has no file_name"):
        CocoInstances(tmp_path / "b.json", coco / "train2017", train=True)


@pytest.mark.slow
def test_3_resuming_a_finished_run_keeps_its_results(tmp_path):
    first = pretrain(tiny(tmp_path))
    again = pretrain(tiny(tmp_path), resume="auto")
    assert again["step"] == first["step"] and again["final_loss"] == first["final_loss"]
    assert json.loads((tmp_path / "results.json").read_text())["final_loss"] == first["final_loss"]


# ----------------------------------------------------------------------------- silently wrong
@pytest.mark.parametrize(
    "schema, setting, message",
    [  # 5, 10, 14: each refused when the config loads, naming the key
        ("pretrain", "optim.clip_grad=-1.0", "optim.clip_grad=-1.0: must be greater than 0"),
        ("pretrain", "train.epochs=0", "train.epochs=0: must be greater than 0"),
        ("pretrain", "data.crop_scale=[1.0,0.2]", r"crop_scale=\[1.0, 0.2\]: must be increasing"),
        ("pretrain", "optim.warmup_epochs=-1", "optim.warmup_epochs=-1.0: must be at least 0"),
        ("pretrain", "log.every_steps=0", "log.every_steps=0: must be greater than 0"),
        ("pretrain", "optim.betas=[0.9]", r"optim.betas=\[0.9\]: must have 2 values"),
        ("pretrain", "train.batch_size=0", "train.batch_size=0: must be greater than 0"),
        ("pretrain", "model.mask_ratio=1.2", "model.mask_ratio=1.2: must be less than 1"),
        ("pretrain", "model.name=crossmae_vit_bsae", "not a registered model"),
        ("frozen", "knn.k=0", "knn.k=0: must be greater than 0"),
        ("frozen", "probe.blrs=[0.1,-0.1]", "each value must be greater than 0"),
        ("frozen", "probe.epochs=0", "probe.epochs=0: must be greater than 0"),
        ("linprobe", "optim.blr=-0.1", "optim.blr=-0.1: must be greater than 0"),
        ("linprobe", "train.epochs=0", "train.epochs=0: must be greater than 0"),
        ("finetune", "data.label_smoothing=1.5", "data.label_smoothing=1.5: must be less than 1"),
        ("finetune", "model.drop_path_rate=1.5", "model.drop_path_rate=1.5: must be less than 1"),
        ("seg", "data.crop=0", "data.crop=0: must be greater than 0"),
        ("det", "optim.milestones=[10,5]", "must be increasing"),
    ],
)  # fmt: skip
def test_5_10_14_nonsense_settings_are_refused_naming_the_key(schema, setting, message):
    from cls.config import FinetuneConfig, FrozenEvalConfig, LinprobeConfig
    from det.config import DetConfig
    from seg.config import SegConfig

    schemas = {"pretrain": PretrainConfig, "frozen": FrozenEvalConfig, "seg": SegConfig,
               "linprobe": LinprobeConfig, "finetune": FinetuneConfig,
               "det": DetConfig}  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        load_config(schemas[schema], [], [setting])


@pytest.mark.slow
def test_6_skipped_nonfinite_steps_are_counted_not_averaged_as_zero(tmp_path, monkeypatch):
    from test_train import NanAfter

    import crossmae.pretrain as train_mod

    build = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda m: NanAfter(build(m), {2, 3}))
    pretrain(tiny(tmp_path / "a"))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    rows = [r for r in rows if "loss" in r]  # the training records
    assert [r.get("skipped_steps") for r in rows[:4]] == [None, 1, 1, None]
    assert all(r["loss"] is None for r in rows[1:3])  # no step to average: null, not 0.0
    monkeypatch.setattr(train_mod, "build_model", lambda m: NanAfter(build(m), range(1, 100)))
    with pytest.raises(FloatingPointError, match="no checkpoint was written yet"):
        pretrain(tiny(tmp_path / "b", "train.max_nonfinite_steps=2"))


def test_7_16_bit_images_are_scaled_not_clipped(tmp_path):
    from crossmae.data import load_rgb

    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    rgb = np.asarray(load_rgb(tmp_path / "ramp16.png"))
    assert rgb.shape == (8, 256, 3)
    assert rgb[0, :, 0].tolist() == list(range(256))  # 0..65535 -> 0..255, in order


@pytest.mark.slow
def test_8_resuming_with_other_settings_is_refused_unless_asked(tmp_path):
    pretrain(tiny(tmp_path, "train.epochs=1"))
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"optim.blr: 0.0015 -> 0.003.*resume_with_changes"):
        pretrain(tiny(tmp_path, "train.epochs=1", "optim.blr=0.003"), resume="auto")
    assert (tmp_path / "config.yaml").read_text() == saved  # not overwritten
    # log settings may change; other settings on purpose
    pretrain(tiny(tmp_path, "train.epochs=1", "log.every_steps=2"), resume="auto")
    changed = tiny(tmp_path, "train.epochs=2", "train.resume_with_changes=true")
    assert pretrain(changed, resume="auto")["step"] == 8
    assert "epochs: 2" in (tmp_path / "config.yaml").read_text()


def test_8_a_path_spelt_another_way_is_the_same_setting(tmp_path, monkeypatch):
    from crossmae.config import changed_settings

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "encoder.pt").write_bytes(b"x")
    (tmp_path / "runs" / "other.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    saved = {"encoder": {"checkpoint": str(tmp_path / "runs" / "encoder.pt")}, "seed": 0}
    now = OmegaConf.create({"encoder": {"checkpoint": "runs/../runs/encoder.pt"}, "seed": 0})
    assert changed_settings(saved, now) == []  # absolute when started, relative on resume
    now.encoder.checkpoint = "runs/other.pt"  # another file with the same bytes: a change
    assert changed_settings(saved, now) == [f"encoder.checkpoint: {tmp_path}/runs/encoder.pt -> "
                                            "runs/other.pt"]  # fmt: skip
    now.encoder.checkpoint = "missing.pt"  # nothing on disk to show they are one file
    assert len(changed_settings(saved, now)) == 1


@pytest.mark.parametrize("mask, expected", [(0.9, 0.9), (0.5, 0.5), (0.75, 0.75)])
def test_9_the_prediction_ratio_defaults_to_the_mask_ratio(mask, expected):
    from crossmae.pretrain import build_model

    cfg = load_config(PretrainConfig, [], [*TINY, f"model.mask_ratio={mask}"])
    model = build_model(cfg.model)
    assert (model.mask_ratio, model.pred_ratio) == (mask, expected)


def test_10_a_crop_that_is_not_a_multiple_of_the_patch_is_refused():
    from seg.config import SegConfig
    from seg.model import build_segmenter

    cfg = load_config(SegConfig, [], ["data.crop=100", "model.channels=8"])
    enc = dict(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4.0,
               norm_eps=1e-6)  # fmt: skip
    with pytest.raises(ConfigError, match="data.crop=100 is not a multiple of the patch size 16"):
        build_segmenter(cfg, 3, enc)


def test_11_a_label_map_of_another_size_names_the_file(tmp_path):
    from crossmae.data.datasets import LabelError
    from seg.data import LabelSpec, SegFolder

    for split in ("images", "annotations"):
        (tmp_path / split / "train").mkdir(parents=True)
    Image.new("RGB", (16, 12)).save(tmp_path / "images" / "train" / "a.jpg")
    Image.new("L", (16, 8)).save(tmp_path / "annotations" / "train" / "a.png")
    Image.new("RGB", (16, 12)).save(tmp_path / "images" / "train" / "b.jpg")
    Image.fromarray(np.full((12, 16), 7, np.uint8)).save(
        tmp_path / "annotations" / "train" / "b.png"
    )
    folder = SegFolder(tmp_path, "train", LabelSpec(num_classes=3))
    with pytest.raises(LabelError, match=r"a.png: a \(8, 16\) label map for a \(12, 16\) image"):
        folder[0]
    with pytest.raises(LabelError, match=r"b.png: label values \[7\] in the file are outside "
                       r"the 3 classes 0..2"):  # fmt: skip
        folder[1]


def test_12_psnr_leaves_out_and_names_unreadable_files(shared_dir, tmp_path, capsys):
    from test_data import add_bad_files, cifar_folder

    root = cifar_folder(shared_dir, tmp_path / "data", per_class=4, classes=1)
    add_bad_files(root / "airplane", next((root / "airplane").iterdir()))
    pretrain(tiny(tmp_path / "run", "train.epochs=1"))
    args = [str(tmp_path / "run" / LAST), "--data", str(root), "--images", "100"]
    assert main(["psnr", *args]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["images"] == 4  # the 4 readable images, none counted twice
    names = {Path(s.split(" (")[0]).name for s in record["skipped_files"]}
    assert names == {"corrupt.jpg", "truncated.jpg", "fake.png"}


def test_12_records_and_summary_count_skipped_files_alike(shared_dir, tmp_path):
    from test_data import add_bad_files, cifar_folder

    root = cifar_folder(shared_dir, tmp_path / "data", per_class=10, classes=2)
    add_bad_files(root / "airplane", next((root / "airplane").iterdir()))
    summary = pretrain(tiny(tmp_path / "run", f"data.path={root}", "train.batch_size=8"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    last = [r for r in rows if "loss" in r][-1]  # the last training record
    assert last["skipped_files"] == summary["skipped_files"] == 3


# ----------------------------------------------------------------------------- crashes
def test_13_unreadable_images_are_skipped_in_training_and_named_in_evaluation(shared_dir, tmp_path):
    from test_data import cifar_folder

    from cls.data import class_folders
    from crossmae.data import Labelled
    from crossmae.data.datasets import UnreadableImage

    root = cifar_folder(shared_dir, tmp_path / "train", per_class=3, classes=2)
    bad = root / "airplane" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    src, _ = class_folders(root, root)
    i = src.files.index(bad)
    skipping = Labelled(src, lambda im: torch.zeros(1), skip_unreadable=True)
    assert skipping[i][2] == (i + 1) % len(src)  # the next readable image stands in
    with pytest.raises(UnreadableImage, match="broken.png"):
        Labelled(src, lambda im: torch.zeros(1))[i]


def test_13_seg_training_skips_an_unreadable_image(shared_dir, tmp_path):
    import shutil

    from seg.data import CAMVID, SegFolder

    root = tmp_path / "camvid"
    shutil.copytree(shared_dir / "data" / "camvid" / "images" / "val", root / "images" / "val")
    shutil.copytree(shared_dir / "data" / "camvid" / "annotations" / "val",
                    root / "annotations" / "val")  # fmt: skip
    first = sorted((root / "images" / "val").iterdir())[0]
    first.write_bytes(first.read_bytes()[:200])  # truncated
    img, label, name = SegFolder(root, "val", CAMVID, skip_unreadable=True)[0]
    assert name != first.stem and img.shape[1:] == label.shape


# ----------------------------------------------------------------------------- messages
def test_15_expected_problems_are_one_line_errors(tmp_path, capsys):
    random_file = tmp_path / "random.pt"
    random_file.write_bytes(os.urandom(1000))
    (tmp_path / "bad.yaml").write_text("train:\n  epochs: [1, \n")
    seg_ckpt = tmp_path / "seg.pt"
    save_atomic({"format": "crossmae-seg-v2", "config": {}, "model": {}}, seg_ckpt)
    cases = [
        (["cls", "finetune", "data.train=x", "data.val=y", f"output_dir={tmp_path}/o"],
         "set the required value(s) ['encoder.checkpoint']"),
        (["pretrain", "--config", str(tmp_path / "bad.yaml")], "bad.yaml line 3: not valid YAML"),
        (["pretrain", *TINY, "train.batch_size=0"], "train.batch_size=0: must be greater than 0"),
        (["det", "evaluate", str(seg_ckpt), "--json", "a.json", "--images", "d"],
         "is a 'crossmae-seg-v2' checkpoint (a UperNet segmenter trained by seg train or "
         "imported by seg import-mmseg), not a 'crossmae-det-v2' checkpoint"),
        (["convert", "to-timm", str(random_file), str(tmp_path / "t.pth")],
         "random.pt is not a loadable checkpoint"),
        (["pretrain", *TINY, f"output_dir={tmp_path / 'r'}", "--resume", str(seg_ckpt)],
         "is a 'crossmae-seg-v2' checkpoint (a UperNet segmenter trained by seg train or "
         "imported by seg import-mmseg), not a 'crossmae-pretrain-v1' checkpoint"),
    ]  # fmt: skip
    for argv, message in cases:  # in process: an exception that escapes fails the test
        capsys.readouterr()
        assert main(argv) == 2, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and message in errors[0], (argv, errors)


def test_15_a_failed_write_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / LAST
    save_atomic({"format": "x", "step": 1}, path)

    def full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc] file write failed") from (
            OSError(28, "No space left on device")
        )

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=f"could not write {path}.*No space left on device"):
        save_atomic({"format": "x", "step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


@pytest.mark.parametrize(
    "argv, required",
    [(["cls", "finetune"], "data.train, data.val, encoder.checkpoint, output_dir"),
     (["det", "train"], "data.train_images, data.train_json"),
     (["seg", "train"], "data.root, encoder.checkpoint, output_dir"),
     (["pretrain"], "None is required")],
)  # fmt: skip
def test_16_help_names_the_sections_and_the_required_settings(argv, required, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Settings are key=value over the sections" in text and required in text


def test_15_transfer_given_a_random_file_says_so(tmp_path, monkeypatch, capsys):
    random_file = tmp_path / "random.pt"
    random_file.write_bytes(os.urandom(1000))
    for var in ("IMAGENET", "COCO", "ADE20K"):
        monkeypatch.setenv(var, str(tmp_path))
    assert main(["transfer", str(random_file), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "random.pt is not a loadable checkpoint" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- signals, stale
# results, diverged runs, the last tracebacks: each test is one case, the rule it illustrates in
# its docstring
def crossmae_cli(*args: str, **kw) -> subprocess.Popen:
    """``python -m crossmae ARGS`` in a session of its own (its process group: what a terminal,
    ``timeout`` or Slurm signal), with SIGINT's default handling as a terminal gives it (a
    test run started as a background job of a non-interactive shell inherits SIGINT ignored)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def default_sigint() -> None:  # and SIGHUP's, which nohup would have ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "crossmae", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=default_sigint, **kw)  # fmt: skip


def wait_for(proc: subprocess.Popen, path: Path, test, timeout: float = 180) -> None:
    import time

    end = time.time() + timeout
    while time.time() < end:
        if path.is_file() and test(path.read_text()):
            return
        if proc.poll() is not None:
            pytest.fail(f"ended early:\n{proc.stdout.read()}")
        time.sleep(0.02)
    pytest.fail(f"{path} never showed what was waited for")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])  # fmt: skip
def test_a_stop_signal_during_an_evaluation_with_data_workers_is_one_line(shared_dir, tmp_path,
                                                                          sig):  # fmt: skip
    """An evaluation (no training loop) stopped by any ending signal to the process group: one
    line naming it, its status (130 for Ctrl-C, 128 + the signal's number otherwise), no
    traceback and no lock left in the run folder."""
    from conftest import tiny_encoder_export

    tiny_encoder_export(tmp_path / "enc.pt", embed_dim=32, depth=2, num_heads=2)
    cifar = shared_dir / "data" / "cifar10"
    proc = crossmae_cli("cls", "frozen", f"encoder.checkpoint={tmp_path / 'enc.pt'}",
                        f"data.train={cifar / 'train'}", f"data.val={cifar / 'test'}",
                        "data.img_size=32", "data.num_workers=2", "data.batch_size=16",
                        f"output_dir={tmp_path / 'eval'}")  # fmt: skip
    wait_for(proc, tmp_path / "eval" / "log.txt", lambda t: "features of" in t)
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "crossmae cls frozen: interrupted" in out, out
    else:
        assert proc.returncode == 128 + sig, out
        assert f"crossmae cls frozen: stopped by {sig.name}" in out, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert not (tmp_path / "eval" / "run.lock").exists()


def test_a_diverged_run_does_not_look_finished(tmp_path, monkeypatch, capsys):
    """A run whose last steps are non-finite (fewer than max_nonfinite_steps): no final
    checkpoint over the last good one, no export of its state, results.json says diverged, and
    the command exits 2 with one line."""
    from test_train import NanAfter

    import crossmae.pretrain as train_mod

    build = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda m: NanAfter(build(m), {7, 8}))
    assert main(["pretrain", *TINY, "log.vis_every_epochs=0", f"output_dir={tmp_path}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "the run diverged" in errors[0], errors
    assert json.loads((tmp_path / "results.json").read_text())["diverged"] is True
    # skipped steps leave the weights as they were: the epoch-2 checkpoint holds step 6's, but the
    # export of a state whose last step was non-finite is not refreshed
    assert load_checkpoint(tmp_path / LAST)["step"] == 8
    assert torch.load(tmp_path / "encoder.pt", weights_only=True)["step"] == 4


@pytest.mark.slow
def test_a_converter_never_replaces_its_input_or_a_checkpoint_of_another_kind(tmp_path, capsys):
    pretrain(tiny(tmp_path / "run", "train.epochs=1"))
    ckpt = tmp_path / "run" / LAST
    before = ckpt.read_bytes()
    for conversion in ("to-mmseg", "to-timm", "to-mae", "to-official"):
        assert main(["convert", conversion, str(ckpt), str(ckpt)]) == 2, conversion
        assert "is the input file" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    other.write_bytes(before)  # another pretraining checkpoint
    assert main(["convert", "to-timm", str(tmp_path / "run" / "encoder.pt"), str(other)]) == 2
    assert "exists and is a 'crossmae-pretrain-v1' checkpoint" in capsys.readouterr().err
    assert ckpt.read_bytes() == before == other.read_bytes()
    assert main(["convert", "to-timm", str(ckpt), str(tmp_path / "t.pth")]) == 0  # a new file
    assert main(["convert", "to-timm", str(ckpt), str(tmp_path / "t.pth")]) == 0  # its own kind
    assert main(["convert", "to-timm", str(ckpt), str(other), "--force"]) == 0  # when asked


def test_repeated_coco_ids_are_refused_naming_the_id(shared_dir, tmp_path):
    from det.data import AnnotationError, CocoInstances

    coco = shared_dir / "data" / "coco128"
    data = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    first = data["annotations"][0]["id"]
    for ann in data["annotations"][1:13]:
        ann["id"] = first
    (tmp_path / "a.json").write_text(json.dumps(data))
    for train in (True, False):
        with pytest.raises(AnnotationError, match=f"annotations id {first} appears 13 times"):
            CocoInstances(tmp_path / "a.json", coco / "train2017", train=train)
    data["images"][1]["id"] = data["images"][0]["id"]
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match="images id .* appears 2 times"):
        CocoInstances(tmp_path / "b.json", coco / "train2017", train=False)


def test_det_training_without_a_usable_instance_says_why(shared_dir, tmp_path):
    from det.data import AnnotationError, CocoInstances

    coco = shared_dir / "data" / "coco128"
    data = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    for i, ann in enumerate(data["annotations"]):
        if i % 2:
            ann["iscrowd"] = 1
        else:
            ann["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]  # 2 points
    (tmp_path / "a.json").write_text(json.dumps(data))
    n, crowd = len(data["annotations"]), sum(a["iscrowd"] for a in data["annotations"])
    why = rf"\({n} annotations, left out: {crowd} crowd, {n - crowd} no polygon"
    with pytest.raises(AnnotationError, match="no image has an instance to train on " + why):
        CocoInstances(tmp_path / "a.json", coco / "train2017", train=True)


def test_ablate_checks_every_setting_and_split_before_the_first_run(shared_dir, tmp_path, capsys):
    from test_data import cifar_folder

    train = cifar_folder(shared_dir, tmp_path / "train", per_class=2, classes=2)
    val = cifar_folder(shared_dir, tmp_path / "val", per_class=2, classes=3)  # a class more
    base = ["ablate", "--train", str(train), "--out", str(tmp_path / "out"), "--seeds", "1"]
    assert main([*base, "--val", str(val), "--variants", "mae", *TINY]) == 2
    assert "train and val classes differ" in capsys.readouterr().err
    assert main([*base, "--val", str(train), "--variants", "mae", "frozen.probe.epoch=3"]) == 2
    assert "probe.epoch" in capsys.readouterr().err
    assert not (tmp_path / "out" / "mae").exists()  # no run started
    # settings written after --variants are settings
    assert main([*base, "--val", str(train), "--variants", "mae", "crossmae_g0.25",
                 "train.epochs=0"]) == 2  # fmt: skip
    assert "train.epochs=0: must be greater than 0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_warmup_as_long_as_the_run_is_named(tmp_path):
    pretrain(tiny(tmp_path, "optim.warmup_epochs=3"))  # 2 epochs
    assert "the lr never reaches its peak" in (tmp_path / "log.txt").read_text()


def test_degenerate_class_sets(shared_dir, tmp_path):
    """Fewer than 2 classes is an error; top-5 of 5 classes or fewer is null, as cls frozen."""
    from test_data import cifar_folder

    from cls.data import class_folders
    from cls.finetune import evaluate_classifier
    from crossmae.models import VisionTransformer

    one = cifar_folder(shared_dir, tmp_path / "one", per_class=2, classes=1)
    with pytest.raises(ValueError, match="1 class folder"):
        class_folders(one, one)
    two = cifar_folder(shared_dir, tmp_path / "two", per_class=2, classes=2)
    src, _ = class_folders(two, two)
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                              num_classes=2)  # fmt: skip
    acc = evaluate_classifier(model, src, 32, workers=0)
    assert acc["top5"] is None and 0 <= acc["top1"] <= 100


@pytest.mark.parametrize(
    "argv, message",
    [(["convert", "from-official", "{ckpt}", "{out}", "--arch", "mae_vit_tiny_patch8", "bogus=3"],
      "has no setting bogus"),
     (["psnr", "{ckpt}", "--data", "{data}", "--images", "-5"], "--images: must be at least 1"),
     (["benchmark", "step", "--tiny", "--batch", "0"], "--batch: must be at least 1"),
     (["pretrain", *TINY, "train.device=cuda"], "train.device=cuda: this machine has no CUDA"),
     (["cls", "linprobe", "train.device=cuda", "encoder.checkpoint={ckpt}", "data.train={data}",
       "data.val={data}", "output_dir={out}"], "train.device=cuda: this machine has no CUDA"),
     (["seg", "train", "model.out_indices=[3,5,7,11]", "encoder.checkpoint={enc}",
       "data.root={camvid}", "data.dataset=camvid", "data.train_split=val",
       "data.val_split=val", "data.crop=64", "output_dir={out}", "train.device=cpu"],
      "model.out_indices=[3, 5, 7, 11] needs an encoder of at least 12 blocks;"),
     (["seg", "train", "data.crop=4096", "data.scale=[240,180]", "encoder.checkpoint={enc}",
       "data.root={camvid}", "data.dataset=camvid", "data.train_split=val",
       "data.val_split=val", "output_dir={out}"], "data.crop=4096 is larger than any image")],
    ids=["convert-setting", "psnr-images", "benchmark-batch", "pretrain-cuda", "cls-cuda",
         "seg-out-indices", "seg-crop"],
)  # fmt: skip
def test_expected_problems_are_one_line_errors_before_anything_runs(
    shared_dir, inputs, tmp_path, capsys, argv, message
):
    import torch.cuda

    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    values = {**inputs, "out": tmp_path / "out", "camvid": shared_dir / "data" / "camvid"}
    argv = [a.format(**values) for a in argv]
    capsys.readouterr()
    with pytest.raises(SystemExit) if argv[0] in ("psnr", "benchmark") else _no_exit() as ex:
        code = main(argv)
    code = ex.value.code if isinstance(ex, pytest.ExceptionInfo) else code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def inputs(shared_dir, tmp_path_factory) -> dict:
    """A pretraining checkpoint, an encoder export and a 2-class image folder."""
    from conftest import tiny_encoder_export
    from test_data import cifar_folder

    d = tmp_path_factory.mktemp("inputs")
    pretrain(load_config(PretrainConfig, [], [*TINY, "train.epochs=1", f"output_dir={d / 'run'}"]))
    tiny_encoder_export(d / "enc.pt", embed_dim=32, depth=2, num_heads=2)
    data = cifar_folder(shared_dir, d / "data", per_class=2, classes=2)
    return {"ckpt": d / "run" / LAST, "enc": d / "enc.pt", "data": data}


class _no_exit:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_submit_refuses_zero_nodes(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["submit.py", "--nodes", "0", "output_dir=x"])
    with pytest.raises(SystemExit) as ex:
        runpy.run_path(str(REPO / "tools" / "submit.py"), run_name="__main__")
    assert ex.value.code == 2 and "--nodes: must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_nonfinite_steps_are_numbered_as_in_the_records(tmp_path, monkeypatch):
    from test_train import NanAfter

    import crossmae.pretrain as train_mod

    build = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda m: NanAfter(build(m), {2}))
    pretrain(tiny(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if r.get("skipped_steps")] == [2]
    assert "step 2: non-finite loss, step skipped" in (tmp_path / "log.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("monitor", ["knn", "probe"])
def test_a_failing_evaluation_inside_training_loses_no_training(shared_dir, tmp_path, monitor):
    """An evaluation inside training that fails on its data (a zero-byte image in the kNN
    monitor's or the online probe's val folder, read by data workers) is one error line and a
    record, and training goes on to its end; asked to stop (train.stop_on_eval_error=true), the
    run ends with one line, the epoch's checkpoint and encoder.pt written before the evaluation,
    no lock and no data worker left (the command returns within its timeout)."""
    from test_data import cifar_folder

    train = cifar_folder(shared_dir, tmp_path / "train", per_class=16, classes=2)
    val = cifar_folder(shared_dir, tmp_path / "val", per_class=3, classes=2)
    (val / "airplane" / "empty.png").write_bytes(b"")
    if monitor == "knn":
        settings = [f"data.knn_train={train}", f"data.knn_val={val}", "log.knn_every_epochs=1"]
    else:
        settings = [f"data.path={train}", f"probe.val={val}"]
    tiny = [s for s in TINY if not s.startswith("data.num_workers")]
    args = ["pretrain", *tiny, *settings, "data.num_workers=2", "log.progress=false"]
    run = tmp_path / "run"
    proc = crossmae_cli(*args, f"output_dir={run}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert out.count("failed, training goes on") == 2 and "empty.png" in out, out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert len([r for r in rows if "evaluation_error" in r]) == 2
    result = json.loads((run / "results.json").read_text())
    steps = 8 if monitor == "knn" else 4  # 2 epochs of 64 built-in crops / of 32 images, batch 16
    assert result["interrupted"] is False and result["step"] == steps
    assert load_checkpoint(run / LAST)["step"] == steps and (run / "encoder.pt").is_file()

    stop = tmp_path / "stop"
    proc = crossmae_cli(*args, "train.stop_on_eval_error=true", f"output_dir={stop}")
    out, _ = proc.communicate(timeout=300)
    errors = [line for line in out.splitlines() if "crossmae pretrain: error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "empty.png" in errors[0], out
    assert "Traceback" not in out
    steps_per_epoch = load_checkpoint(run / LAST)["step"] // 2
    assert load_checkpoint(stop / LAST)["step"] == steps_per_epoch  # epoch 1, before evaluating
    assert torch.load(stop / "encoder.pt", weights_only=True)["step"] == steps_per_epoch
    assert not (stop / "run.lock").exists()


@pytest.mark.slow
def test_no_command_replaces_another_runs_results_without_force(shared_dir, tmp_path, capsys):
    """A run folder's checkpoint or results.json is replaced only with --force: a fresh run
    into it, a checkpoint of another folder resumed into it, and an evaluation (cls frozen,
    which takes no --resume and is not told to use it) into an earlier one are refused, naming
    the folder and the ways out; --force replaces."""
    from conftest import tiny_encoder_export
    from test_data import cifar_folder

    base = ["pretrain", *TINY, "log.vis_every_epochs=0"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*base, f"output_dir={a}"]) == 0
    assert main([*base, "train.seed=1", f"output_dir={b}"]) == 0
    before = (b / LAST).read_bytes()
    capsys.readouterr()
    assert main([*base, f"output_dir={b}"]) == 2
    assert main([*base, "--resume", str(a / LAST), f"output_dir={b}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(f"{b} already holds a run (checkpoint-last.pt)" in e for e in err)
    assert "resuming" in err[1] and "from another folder would replace it" in err[1]
    assert all("--force" in e and "--resume auto" in e for e in err)
    assert (b / LAST).read_bytes() == before
    own = [*base, "train.seed=1", "--resume", str(b / LAST), f"output_dir={b}"]
    assert main(own) == 0  # its own checkpoint: fine
    assert main([*base, "--resume", str(a / LAST), f"output_dir={b}", "--force"]) == 0

    tiny_encoder_export(tmp_path / "enc.pt", embed_dim=32, depth=2, num_heads=2)
    train = cifar_folder(shared_dir, tmp_path / "train", per_class=4, classes=2)
    val = cifar_folder(shared_dir, tmp_path / "val", per_class=2, classes=2)
    frozen = ["cls", "frozen", f"encoder.checkpoint={tmp_path / 'enc.pt'}", f"data.train={train}",
              f"data.val={val}", "data.img_size=32", "data.num_workers=0", "probe.epochs=2",
              "probe.warmup_epochs=0", "probe.batch_size=4", "knn.ks=[3]", "knn.k=3",
              f"output_dir={tmp_path / 'eval'}"]  # fmt: skip
    assert main(frozen) == 0
    results = (tmp_path / "eval" / "results.json").read_text()
    capsys.readouterr()
    assert main([*frozen, "probe.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (results.json)" in err and "--force" in err
    assert "--resume" not in err  # cls frozen takes none
    assert (tmp_path / "eval" / "results.json").read_text() == results
    assert main([*frozen, "probe.epochs=3", "--force"]) == 0


@pytest.mark.slow
def test_the_feature_cache_is_keyed_by_the_files_it_was_made_from(shared_dir, tmp_path, capfd):
    """cls frozen's cache: a val image replaced by another (same count, same names) or added, or
    the encoder file rewritten, computes the features again; a truncated cache file is computed
    again with a warning, not a traceback."""
    import shutil
    import time

    from conftest import tiny_encoder_export
    from test_data import cifar_folder

    tiny_encoder_export(tmp_path / "enc.pt", embed_dim=32, depth=2, num_heads=2)
    train = cifar_folder(shared_dir, tmp_path / "train", per_class=4, classes=2)
    val = cifar_folder(shared_dir, tmp_path / "val", per_class=3, classes=2)
    cache = tmp_path / "cache"
    args = ["cls", "frozen", f"encoder.checkpoint={tmp_path / 'enc.pt'}", f"data.train={train}",
            f"data.val={val}", "data.img_size=32", "data.num_workers=0", "probe.epochs=1",
            "probe.warmup_epochs=0", "probe.batch_size=4", "knn.ks=[3]", "knn.k=3",
            f"data.cache_dir={cache}"]  # fmt: skip

    log = []

    def cached() -> int:
        capfd.readouterr()
        assert main(args) == 0
        log[:] = capfd.readouterr().err.splitlines()
        return sum("features from cache" in line for line in log)

    assert cached() == 0 and cached() == 2  # made, then both splits read back
    first = sorted((val / "airplane").iterdir())[0]
    other = sorted((train / "automobile").iterdir())[0]
    time.sleep(0.01)
    first.unlink()
    shutil.copyfile(other, first)  # the same name, another picture
    assert cached() == 1  # train from the cache, val computed again
    shutil.copyfile(other, val / "airplane" / "extra.png")
    assert cached() == 1
    tiny_encoder_export(tmp_path / "enc.pt", embed_dim=32, depth=2, num_heads=2)  # rewritten
    assert cached() == 0
    for f in cache.iterdir():
        f.write_bytes(f.read_bytes()[:100])
    assert cached() == 0
    assert sum("is unreadable" in line and "computed again" in line for line in log) == 2


def test_a_knn_k_beyond_the_training_images_says_what_was_used(shared_dir, tmp_path, capfd):
    """knn.k (and each of knn.ks) larger than the training set votes with all its images: the
    log says so, the result line shows the k used, and results.json records it."""
    from conftest import tiny_encoder_export
    from test_data import cifar_folder

    tiny_encoder_export(tmp_path / "enc.pt", embed_dim=32, depth=2, num_heads=2)
    train = cifar_folder(shared_dir, tmp_path / "train", per_class=4, classes=2)
    val = cifar_folder(shared_dir, tmp_path / "val", per_class=2, classes=2)
    out = tmp_path / "eval"
    assert main(["cls", "frozen", f"encoder.checkpoint={tmp_path / 'enc.pt'}",
                 f"data.train={train}", f"data.val={val}", "data.img_size=32",
                 "data.num_workers=0", "probe.epochs=1", "probe.warmup_epochs=0",
                 "probe.batch_size=4", "knn.k=100", "knn.ks=[3,200]",
                 f"output_dir={out}"]) == 0  # fmt: skip
    err = capfd.readouterr().err
    assert "k = 100, 200 asked, but there are 8 training images: each of these uses k = 8" in err
    assert "(k = 8: all the training images, 100 asked)" in err
    m = json.loads((out / "results.json").read_text())["metrics"]
    assert m["knn_k"] == 8 and m["knn_by_k"]["200"]["k_used"] == 8
    assert m["knn_by_k"]["3"]["k_used"] == 3
    assert m["knn_by_k"]["100"]["top1"] == m["knn_by_k"]["200"]["top1"]


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_whose_peers_never_start_says_so_in_bounded_time(tmp_path, rank):
    """WORLD_SIZE=2 and no other process: the main process names the processes that did not
    join, another one the main process it could not reach, one line each, within
    CROSSMAE_JOIN_TIMEOUT, instead of waiting in silence."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "RANK": str(rank),
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "CROSSMAE_JOIN_TIMEOUT": "3",
    }
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    proc = subprocess.run([sys.executable, "-m", "crossmae", "pretrain", *TINY,
                           f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    who = "1 other process(es) (RANK 1..1) did not join" if rank == 0 else (
        f"no main process (RANK 0) answered at 127.0.0.1:{port}")  # fmt: skip
    assert f"WORLD_SIZE=2, RANK={rank}: {who} within 3 s" in errors[0], errors
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_print_config_and_resume_use_the_runs_own_settings(tmp_path, capsys):
    """--resume continues a run with the settings it was trained with (its config.yaml under
    the command's own), and --print-config --resume shows those settings, not the defaults."""
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, "train.seed=3", "log.vis_every_epochs=0",
                 f"output_dir={run}"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["pretrain", "--print-config", "--resume", "auto", f"output_dir={run}"]) == 0
    printed = capsys.readouterr().out
    assert "seed: 3" in printed and "embed_dim: 32" in printed and "img_size: 32" in printed
    assert main(["pretrain", "--print-config", "--resume", str(run / LAST)]) == 0
    assert "seed: 3" in capsys.readouterr().out
    assert main(["pretrain", "--resume", "auto", f"output_dir={run}"]) == 0  # nothing left to do
    assert main(["pretrain", "--resume", "auto", f"output_dir={run}", "train.seed=4"]) == 2
    assert "train.seed: 3 -> 4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arch, found",
    [
        ("mae_vit_small_patch16", "ViT-tiny (192-d, 12 blocks)"),
        ("mae_vit_tiny_patch8", "ViT-tiny (192-d, 12 blocks)"),
    ],
)
def test_an_official_file_read_as_another_architecture_is_one_line(tmp_path, arch, found):
    """encoder.official_arch of another width, or of another patch size, names what the file
    holds and what was asked, before any model is built (a strict load would otherwise fail
    with torch's list of mismatched tensors)."""
    from crossmae.models import create_model
    from crossmae.models.official import to_official
    from crossmae.models.pretrained import load_pretrained_encoder

    with torch.device("meta"):
        model = create_model("mae_vit_tiny_patch16")
    sd = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    torch.save({"model": to_official(sd, kind="mae")}, tmp_path / "official.pth")
    with pytest.raises(ValueError, match=rf"holds {re.escape(found)}, not the encoder of "
                                         rf"official_arch={arch}"):  # fmt: skip
        load_pretrained_encoder(tmp_path / "official.pth", official_arch=arch)
    _, config = load_pretrained_encoder(tmp_path / "official.pth",
                                        official_arch="mae_vit_tiny_patch16")  # fmt: skip
    assert (config["embed_dim"], config["patch_size"]) == (192, 16)


@pytest.mark.parametrize("stop", ["train.max_steps=6", "train.steps=6"])
def test_a_run_ending_mid_epoch_keeps_its_last_encoder(tmp_path, stop):
    """log.keep_every_epochs keeps the last state as the README says, also when train.steps or
    max_steps ends the run inside an epoch: as the epoch it is in, its step inside."""
    run = tmp_path / "run"
    settings = [s for s in TINY if not s.startswith("train.epochs")]
    if stop.startswith("train.max_steps"):
        settings.append("train.epochs=2")
    else:
        settings.append("train.epochs=null")
    assert main(["pretrain", *settings, stop, "log.keep_every_epochs=1",
                 "log.vis_every_epochs=0", f"output_dir={run}"]) == 0  # fmt: skip
    kept = {p.name: torch.load(p, weights_only=True)["step"] for p in run.glob("encoder-epoch*")}
    assert kept == {"encoder-epoch1.pt": 4, "encoder-epoch2.pt": 6}  # 4 steps per epoch


def test_a_run_started_under_nohup_is_not_stopped_by_a_closed_terminal():
    """SIGHUP stops a run as SIGTERM does, unless the run was started with it ignored (nohup):
    that choice is kept, for training and for every other command."""
    from crossmae.engine import StopRequest

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGHUP) == stop._handle
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.slow
def test_a_process_with_data_workers_still_open_exits():
    """Data workers ignore stop signals (the main process ends the run), so the SIGTERM that
    multiprocessing sends them at interpreter exit cannot end them: a loader left open (its
    persistent workers alive) is closed before that, and the process exits."""
    code = (
        "import torch\n"
        "from crossmae.data.loader import Loader\n"
        "loader = Loader(torch.arange(8.0), batch_size=2, num_workers=2, persistent_workers=True)\n"
        "cycle = [loader]; cycle.append(cycle)  # alive until a collection that exit never runs\n"
        "print(sum(float(b.sum()) for b in loader))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "28.0"


def test_a_training_run_stops_its_data_workers_when_it_ends(tmp_path):
    from crossmae.data.loader import _OPEN

    pretrain(tiny(tmp_path, "train.epochs=1", "data.num_workers=2"))
    assert not [loader for loader in _OPEN if loader._iterator is not None]
