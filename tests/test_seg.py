"""seg/: the evaluator against the ADE20K benchmark's definitions on its real validation samples,
and the data layouts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import REPO, check_random_states, tiny_encoder_export
from PIL import Image

from crossmae.data.datasets import LabelError
from seg.data import ADE20K, CAMVID, IGNORE, SegFolder
from seg.evaluate import slide_inference
from seg.metrics import SegMetrics, pixel_accuracy
from seg.model import SegViT, UperNet


def ade_benchmark_reference(preds: list[np.ndarray], labels: list[np.ndarray], C: int = 150):
    """The benchmark's definitions, written out directly on raw maps (0 = other, 1..C classes):
    per-image pixel accuracy over labelled pixels; per-class IoU over the whole dataset, with
    predictions on unlabelled pixels discarded."""
    pixacc, inter, area_pred, area_lab = [], np.zeros(C), np.zeros(C), np.zeros(C)
    for p, lab in zip(preds, labels, strict=True):
        labelled = lab > 0
        pixacc.append(((p == lab) & labelled).sum() / labelled.sum())
        p = p * labelled
        for c in range(1, C + 1):
            inter[c - 1] += ((p == c) & (lab == c)).sum()
            area_pred[c - 1] += (p == c).sum()
            area_lab[c - 1] += (lab == c).sum()
    union = area_pred + area_lab - inter
    return pixacc, inter, union


@pytest.fixture
def ade(shared_dir):
    root = shared_dir / "data" / "ade20k_samples"
    ds = SegFolder(root, "validation", ADE20K)
    preds = [
        np.array(Image.open(root / "predictions" / "validation" / f"{p.stem}.png"))
        for p, _ in ds.items
    ]
    return ds, preds


def check_against_reference(ds, preds):
    labels = [ds.raw_label(i) for i in range(len(ds))]
    ref_acc, inter, union = ade_benchmark_reference(preds, labels)
    metrics = SegMetrics(150, IGNORE)
    for i, raw_pred in enumerate(preds):
        _, label, _ = ds[i]
        pred = ADE20K.convert(raw_pred)  # the same label space: "other" -> no class
        assert pixel_accuracy(pred, label) == pytest.approx(ref_acc[i], abs=1e-12)
        metrics.update(pred, label)
    result = metrics.compute()
    present = union > 0
    ours = np.array(result["IoU"])
    assert np.allclose(ours[present], 100 * inter[present] / union[present], atol=1e-9)
    assert np.isnan(ours[~present]).all()
    assert result["mIoU"] == pytest.approx(100 * (inter[present] / union[present]).mean())
    return ref_acc, result


def test_evaluator_matches_the_ade20k_benchmark_definitions(ade):
    ds, preds = ade
    # the benchmark's shipped sample predictions agree with the annotations pixel for pixel
    acc, result = check_against_reference(ds, preds)
    assert acc == [1.0, 1.0, 1.0] and result["mIoU"] == 100.0
    # perturbed predictions: a shifted map, a class swapped, "other" painted over a block
    rng = np.random.default_rng(0)
    perturbed = []
    for p in preds:
        q = np.roll(p, shift=(7, -11), axis=(0, 1)).copy()
        q[q == np.bincount(p.ravel()).argmax()] = 3
        h, w = q.shape
        q[h // 3 : h // 2, w // 4 : w // 2] = 0
        q[rng.random(q.shape) < 0.05] = rng.integers(1, 151)
        perturbed.append(q)
    acc, result = check_against_reference(ds, perturbed)
    assert all(0.2 < a < 0.95 for a in acc) and 5 < result["mIoU"] < 90


def test_perfect_predictions_give_miou_1(ade):
    ds, _ = ade
    metrics = SegMetrics(150, IGNORE)
    for i in range(len(ds)):
        _, label, _ = ds[i]
        metrics.update(label, label)
    result = metrics.compute()
    assert result["mIoU"] == result["mAcc"] == result["aAcc"] == 100.0


def test_label_conventions(shared_dir):
    # mmseg's reduce_zero_label: 0 -> 255, k -> k - 1, and a raw 255 (254 after the shift) -> 255
    assert ADE20K.convert(np.array([0, 1, 150, 255])).tolist() == [IGNORE, 0, 149, IGNORE]
    # no such class: an error naming the file's value (151, and 254 beside the ignore 255), not
    # silently ignored
    with pytest.raises(LabelError, match=r"label values \[151, 254\] in the file \(classes "
                       r"\[150, 253\] after reduce_zero_label's shift by one\) are outside the "
                       r"150 classes 0..149"):  # fmt: skip
        ADE20K.convert(np.array([0, 151, 254, 255]))
    lenient = dataclasses.replace(ADE20K, ignore_other_labels=True)
    assert lenient.convert(np.array([0, 151])).tolist() == [IGNORE, IGNORE]
    assert CAMVID.convert(np.array([0, 10, 11])).tolist() == [0, 10, IGNORE]
    cam = SegFolder(shared_dir / "data" / "camvid", "val", CAMVID)
    img, label, _ = cam[0]
    assert img.shape[1:] == label.shape and set(label.unique().tolist()) <= set(range(11)) | {
        IGNORE
    }
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SegFolder(shared_dir / "data" / "camvid", "test", CAMVID)
    names = [p.stem for p, _ in cam.items[5:8]]
    some = SegFolder(shared_dir / "data" / "camvid", "val", CAMVID, names=names[::-1])
    assert some.items == cam.items[5:8]  # the folder's order
    with pytest.raises(FileNotFoundError, match=r"no image named 'nope' in .*val \(1 more\)"):
        SegFolder(shared_dir / "data" / "camvid", "val", CAMVID, names=[names[0], "nope", "x"])


def test_out_of_range_predictions_count_as_wrong():
    m = SegMetrics(2, IGNORE)
    m.update(torch.tensor([0, 5, 1, 1]), torch.tensor([0, 0, 1, IGNORE]))
    r = m.compute()
    assert r["aAcc"] == pytest.approx(100 * 2 / 3) and r["IoU"] == pytest.approx([50.0, 100.0])


class PerPixel(torch.nn.Module):
    """A stand-in segmenter that is a per-pixel function at full resolution."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return {"logits": self.conv(x)}


def test_slide_inference_on_a_non_square_image_off_the_stride_grid():
    torch.manual_seed(0)
    model = PerPixel()
    img = torch.randn(2, 3, 90, 150)  # neither side a multiple of the stride
    slid = slide_inference(model, img, 5, crop=64, stride=43)
    assert slid.shape == (2, 5, 90, 150)
    assert torch.allclose(slid, model(img)["logits"], atol=1e-5)  # every pixel covered, averaged
    small = torch.randn(1, 3, 40, 50)  # smaller than the crop: padded
    assert torch.allclose(
        slide_inference(model, small, 5, crop=64, stride=43), model(small)["logits"], atol=1e-5
    )


def test_upernet_shapes_and_strict_loading(tmp_path):
    from crossmae.models.pretrained import load_pretrained_encoder

    enc = tiny_encoder_export(
        tmp_path / "enc.pt", "mae_vit_base_patch16", embed_dim=32, depth=4, num_heads=2
    )
    sd, cfg = load_pretrained_encoder(tmp_path / "enc.pt")
    backbone = SegViT(**{**cfg, "img_size": 64})
    backbone.load_pretrained(sd, (2, 2))  # MAE's final norm dropped on purpose
    assert torch.equal(backbone.blocks[2].attn.qkv.weight, enc.encoder.blocks[2].attn.qkv.weight)
    model = UperNet(backbone, num_classes=11, channels=16, aux_channels=8)
    out = model(torch.randn(2, 3, 64, 64))
    assert out["logits"].shape == (2, 11, 16, 16) and out["aux_logits"].shape == (2, 11, 4, 4)
    with pytest.raises(KeyError, match="missing keys"):
        backbone.load_pretrained(
            {k: v for k, v in sd.items() if k != "patch_embed.proj.bias"}, (2, 2)
        )


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(shared_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    args = [str(here / "dist_seg_worker.py"), str(shared_dir / "data" / "camvid"), "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here)}
    one = subprocess.run(
        [sys.executable, *args, str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            *args,
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a = json.loads((tmp_path / "one-0.json").read_text())
    for rank in (0, 1):
        b = json.loads((tmp_path / f"two-{rank}.json").read_text())
        assert b["cm_total"] == a["cm_total"] and b["mIoU"] == pytest.approx(a["mIoU"])
        assert b["aAcc"] == pytest.approx(a["aAcc"])


def tiny_camvid_run(shared_dir, tmp_path, run: str, *extra):
    """A config for a few iterations on a 6 + 2 image CamVid copy with a tiny encoder."""
    from crossmae.config import load_config
    from seg.config import SegConfig

    root = tmp_path / "camvid"
    if not root.exists():
        src = shared_dir / "data" / "camvid"
        for split, n in (("train", 6), ("val", 2)):
            for kind in ("images", "annotations"):
                (root / kind / split).mkdir(parents=True)
            for img in sorted((src / "images" / split).iterdir())[:n]:
                (root / "images" / split / img.name).symlink_to(img)
                lab = src / "annotations" / split / (img.stem + ".png")
                (root / "annotations" / split / lab.name).symlink_to(lab)
        tiny_encoder_export(tmp_path / "enc.pt", embed_dim=32, depth=4, num_heads=2)
    return load_config(
        SegConfig,
        [REPO / "configs" / "seg" / "upernet_camvid_small.yaml"],
        [
            f"data.root={root}",
            f"encoder.checkpoint={tmp_path / 'enc.pt'}",
            f"output_dir={tmp_path / run}",
            "data.crop=64",
            "data.scale=[120,90]",
            "eval.stride=43",
            "model.channels=16",
            "train.steps=3",
            "train.batch_size=2",
            "optim.warmup_steps=1",
            "data.num_workers=0",
            "train.precision=fp32",
            "train.device=cpu",
            "log.every_steps=1",
            *extra,
        ],
    )


def train_segmenter(cfg, resume: str | None = None) -> dict:
    """``crossmae seg train`` through the runner."""
    from crossmae.runner import run_task
    from seg.task import SegTask

    return run_task(SegTask(cfg), cfg, resume)


def test_a_few_training_iterations_on_camvid_crops(shared_dir, tmp_path):
    cfg = tiny_camvid_run(shared_dir, tmp_path, "run")
    result = train_segmenter(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(0 < r["loss"] < 100 for r in rows if "loss" in r)
    assert 0 <= result["metrics"]["mIoU"] <= 100 and len(result["metrics"]["per_class"]) == 11
    table = (tmp_path / "run" / "per_class.md").read_text()
    assert "| pedestrian |" in table and "mIoU" in table


def test_flip_and_multi_scale_evaluation(shared_dir):
    from seg.evaluate import evaluate_segmenter

    torch.manual_seed(0)
    folder = SegFolder(shared_dir / "data" / "camvid", "val", CAMVID)
    folder.items = folder.items[:2]
    model = PerPixel()
    model.conv = torch.nn.Conv2d(3, 11, 1)
    args = (model, folder, 11)
    settings = {"crop": 64, "stride": 43, "scale": (120, 90)}
    plain = evaluate_segmenter(*args, **settings)
    # a per-pixel model sees a flipped image the same way: flip testing changes nothing
    assert evaluate_segmenter(*args, **settings, flip=True)["mIoU"] == pytest.approx(plain["mIoU"])
    multi = evaluate_segmenter(*args, **settings, ratios=(0.5, 1.0, 1.5), flip=True)
    assert 0 <= multi["mIoU"] <= 100 and multi["aAcc"] > 0
    whole = evaluate_segmenter(*args, **settings, mode="whole")
    assert 0 <= whole["mIoU"] <= 100 and whole["aAcc"] > 0


def test_interrupted_training_resumes_exactly(shared_dir, tmp_path, monkeypatch):
    import signal

    from crossmae import optim

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    train_segmenter(
        tiny_camvid_run(shared_dir, tmp_path, "a", "train.steps=4", "model.drop_path_rate=0.2")
    )
    orig = optim.SCHEDULES["linear_poly"]

    def stop_during_step_2(step, **kw):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return orig(step, **kw)

    cfg = tiny_camvid_run(shared_dir, tmp_path, "b", "train.steps=4", "model.drop_path_rate=0.2")
    monkeypatch.setitem(optim.SCHEDULES, "linear_poly", stop_during_step_2)
    assert train_segmenter(cfg)["interrupted"]
    monkeypatch.setitem(optim.SCHEDULES, "linear_poly", orig)
    check_random_states(tmp_path / "b" / "checkpoint-last.pt")
    train_segmenter(cfg, resume="auto")
    assert losses("b") == losses("a")


@pytest.mark.slow
def test_distributed_training_uses_syncbn_and_trains_one_crop_per_process(shared_dir, tmp_path):
    """mmseg's SyncBN: a distributed run normalises over every process's crops, so one crop per
    process trains (a per-process BatchNorm cannot: the 1x1 pooling branch would normalise one
    value per channel)."""
    import os
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from crossmae.distributed import CpuSyncBatchNorm, to_sync_batchnorm

    model = UperNet(SegViT(img_size=64, embed_dim=32, depth=4, num_heads=2), 11, channels=16,
                    aux_channels=8)  # fmt: skip
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    synced = to_sync_batchnorm(model, torch.device("cpu"))
    assert sum(isinstance(m, CpuSyncBatchNorm) for m in synced.modules()) == n_bn > 0
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    if torch.cuda.is_available():
        synced = to_sync_batchnorm(model, torch.device("cuda"))
        assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    # one crop per process would fail without the sync
    single = UperNet(SegViT(img_size=64, embed_dim=32, depth=4, num_heads=2), 11, channels=16,
                     aux_channels=8).train()  # fmt: skip
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        single(torch.randn(1, 3, 64, 64))

    cfg = tiny_camvid_run(shared_dir, tmp_path, "ddp", "train.steps=2", "train.batch_size=2")
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "seg", "train", "--config", str(tmp_path / "cfg.yaml")],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 100 for x in losses)
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert "2 process(es) x micro-batch 1 x 1 accumulation = batch 2" in log


def test_training_pipeline_is_mmsegs(shared_dir):
    """RandomResize + RandomCrop (cat_max_ratio, at most 10 redraws) + flip + photometric
    distortion on uint8, then normalisation and zero padding; deterministic per seed."""
    from seg.data import SegAugment, photometric_distortion

    folder = SegFolder(shared_dir / "data" / "camvid", "val", CAMVID)
    aug = SegAugment(folder, crop=128, scale=(240, 180), ratio_range=(0.5, 2.0))
    x, lab = aug[(0, 7)]
    assert x.shape == (3, 128, 128) and lab.shape == (128, 128) and x.dtype == torch.float32
    assert torch.equal(x, aug[(0, 7)][0]) and not torch.equal(x, aug[(0, 8)][0])
    small, small_lab = SegAugment(folder, crop=128, scale=(60, 45), ratio_range=(1.0, 1.0))[(0, 1)]
    assert (small[:, 45:] == 0).all() and (
        small_lab[45:] == IGNORE
    ).all()  # padded after normalising
    # a crop where one class always dominates: 10 redraws, then the 11th window unchecked
    label = np.zeros((300, 300), np.uint8)

    class Counting:
        draws = 0

        def integers(self, lo, hi):
            self.draws += 1
            return np.random.default_rng(self.draws).integers(lo, hi)

    rng = Counting()
    aug.crop_window(label, rng)
    assert rng.draws == 22  # 11 windows x (top, left)

    # photometric distortion: hue moves in OpenCV units of 2 degrees (mmseg's +-18 = +-36 deg)
    class Fixed:
        def __init__(self, ints):
            self.ints = list(ints)

        def integers(self, *args):
            return self.ints.pop(0)

    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    # brightness skipped, contrast last (mode 0), saturation skipped, hue +17, contrast skipped
    out = photometric_distortion(red, Fixed([0, 0, 0, 1, 17, 0]))
    assert out.dtype == np.uint8 and out[0, 0, 0] == 255 and out[0, 0, 2] == 0
    assert out[0, 0, 1] in (144, 145)  # 34 degrees: G = 255 * 34 / 60


def test_pictures_use_the_dataset_palette_and_recolour_only_classes_alike_in_it():
    from seg.visualize import CLOSE, class_colors

    ade = ADE20K.colors()
    assert ade.shape == (150, 3) and CAMVID.colors().shape == (11, 3)
    assert ade[0].tolist() == [120, 120, 120] and CAMVID.colors()[3].tolist() == [128, 64, 128]
    colors, which = class_colors(ade, 150, [0, 2, 12])  # wall, sky, person
    assert which == "dataset palette" and (colors[[0, 2, 12]] == ade[[0, 2, 12]]).all()
    colors, which = class_colors(ade, 150, [2, 6, 48])  # road and skyscraper share 8c8c8c
    assert which == "dataset palette; 1 class(es) alike in it recoloured"
    assert (colors[[2, 6]] == ade[[2, 6]]).all() and (colors[48] != ade[48]).any()
    shown = colors[[2, 6, 48]].astype(float)
    assert min(np.linalg.norm(shown[i] - shown[j]) for i, j in ((0, 1), (0, 2), (1, 2))) >= CLOSE
    many = list(range(0, 150, 7))  # 22 classes: every pair apart, whatever the palette
    colors = class_colors(ade, 150, many)[0][many].astype(float)
    gaps = np.linalg.norm(colors[:, None] - colors[None], axis=-1)
    assert gaps[np.triu_indices(len(many), 1)].min() >= CLOSE
    colors, which = class_colors(None, 5, [1, 3])
    assert which == "distinct colours" and (colors[1] != colors[3]).any()
