"""det/: ViTDet backbone and pyramid, COCO data and evaluation on ../shared/data/coco128, and a
few training iterations of a tiny Mask R-CNN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_encoder_export

from crossmae.checkpoint import load_pretrained_encoder
from det.backbone import SimpleFeaturePyramid, ViTDetBackbone, global_block_indices, strides_ok
from det.data import AnnotationError, CocoInstances, coco_subset
from det.evaluate import coco_evaluate, to_coco_results

TINY_VIT = dict(patch_size=16, embed_dim=64, depth=4, num_heads=2)


def coco128(shared_dir: Path) -> tuple[Path, Path]:
    root = shared_dir / "data" / "coco128"
    return root / "annotations" / "instances_train2017.json", root / "train2017"


def test_global_block_placement():
    assert global_block_indices(12) == [2, 5, 8, 11]
    assert global_block_indices(24) == [5, 11, 17, 23]
    assert global_block_indices(32) == [7, 15, 23, 31]


def test_a_window_covering_the_image_is_global_attention():
    torch.manual_seed(0)
    windowed = ViTDetBackbone(img_size=64, window=4, global_blocks=[], **TINY_VIT).eval()
    global_ = ViTDetBackbone(img_size=64, window=4, global_blocks=[0, 1, 2, 3], **TINY_VIT).eval()
    for blk in windowed.blocks:  # non-zero relative-position tables, to exercise them
        torch.nn.init.normal_(blk.attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(blk.attn.rel_pos_w, std=0.5)
    global_.load_state_dict(windowed.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(windowed(x), global_(x), atol=1e-5)
    # smaller windows with padding (a 5 x 5 grid in 4 x 4 windows) differ but run
    small = ViTDetBackbone(img_size=80, window=4, global_blocks=[3], **TINY_VIT)
    assert small(torch.randn(1, 3, 80, 80)).shape == (1, 64, 5, 5)


def test_pyramid_strides_on_non_square_inputs():
    fpn = SimpleFeaturePyramid(ViTDetBackbone(img_size=64, window=4, **TINY_VIT), out_channels=32)
    for size in [(128, 192), (64, 64), (192, 64)]:  # non-square, multiples of the coarsest stride
        feats = fpn(torch.randn(1, 3, *size))
        assert list(feats) == ["p2", "p3", "p4", "p5", "pool"] and strides_ok(feats, size)
        assert all(f.shape[1] == 32 for f in feats.values())


def test_backbone_loads_an_encoder_strictly(tmp_path):
    model = tiny_encoder_export(tmp_path / "enc.pt", **TINY_VIT)
    sd, cfg = load_pretrained_encoder(tmp_path / "enc.pt")
    bb = ViTDetBackbone(**{**cfg, "img_size": 64, "window": 2})
    bb.load_pretrained(sd, (2, 2))
    assert torch.equal(bb.blocks[3].mlp.fc2.weight, model.encoder.blocks[3].mlp.fc2.weight)
    assert bb.pos_embed.shape == (1, 16, 64)  # cls slot dropped, 2x2 -> 4x4
    with pytest.raises(KeyError, match="blocks.0.attn.qkv.bias"):
        bb.load_pretrained({k: v for k, v in sd.items() if k != "blocks.0.attn.qkv.bias"}, (2, 2))


def test_ground_truth_as_predictions_scores_ap_1(shared_dir):
    ann, images = coco128(shared_dir)
    ds = CocoInstances(ann, images, train=False, img_size=640)
    # images whose longest side is 640 keep their size (scale 1): masks round-trip exactly
    picked = [
        i
        for i in range(len(ds))
        if max(ds.images[ds.ids[i]]["height"], ds.images[ds.ids[i]]["width"]) == 640
    ][:10]
    results, ids = [], []
    for i in picked:
        _, t = ds[i]
        pred = {
            "boxes": t["boxes"],
            "labels": t["labels"],
            "scores": torch.ones(len(t["labels"])),
            "masks": t["masks"][:, None].float(),
        }
        results += to_coco_results(pred, t, ds.cat_ids)
        ids.append(t["image_id"])
    metrics = coco_evaluate(ann, results, ids)
    assert metrics["bbox"]["AP"] == pytest.approx(100.0) and metrics["segm"]["AP"] == pytest.approx(
        100.0
    )
    # and a prediction that misses half the objects does not
    half = coco_evaluate(ann, results[::2], ids)
    assert half["bbox"]["AP"] < 90


def test_training_view_large_scale_jitter(shared_dir):
    ann, images = coco128(shared_dir)
    ds = CocoInstances(ann, images, train=True, img_size=256)
    assert len(ds) == 126  # 2 of the 128 images have no non-crowd annotation
    img, t = ds[(5, 123)]
    assert img.shape == (3, 256, 256) and img.min() >= 0 and img.max() <= 1
    assert t["masks"].shape[1:] == (256, 256) and len(t["boxes"]) == len(t["labels"]) == len(
        t["masks"]
    )
    # boxes are the tight boxes of the cropped masks
    for box, m in zip(t["boxes"], t["masks"], strict=True):
        ys, xs = torch.where(m > 0)
        assert box.tolist() == [
            xs.min().item(),
            ys.min().item(),
            xs.max().item() + 1,
            ys.max().item() + 1,
        ]


def test_malformed_annotations_name_the_annotation(shared_dir, tmp_path):
    ann, images = coco128(shared_dir)
    data = json.loads(ann.read_text())
    data["annotations"][3]["bbox"] = [1, 2, 3]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=f"annotation {data['annotations'][3]['id']}"):
        CocoInstances(bad, images, train=True)
    del data["annotations"][3]["segmentation"]
    bad.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match="missing 'segmentation'"):
        CocoInstances(bad, images, train=True)


def tiny_det_run(shared_dir, tmp_path, run: str, *extra):
    """(config, encoder model, annotation subset, images) for a few iterations of a tiny ViTDet
    on 4 coco128 images."""
    from crossmae.config import load_config
    from det.config import DetConfig

    ann, images = coco128(shared_dir)
    small = coco_subset(ann, tmp_path / "small.json", 4)
    model = tiny_encoder_export(tmp_path / "enc.pt", **TINY_VIT)
    cfg = load_config(
        DetConfig,
        [],
        [
            f"encoder.checkpoint={tmp_path / 'enc.pt'}",
            f"train_json={small}",
            f"train_images={images}",
            f"val_json={small}",
            f"val_images={images}",
            f"output_dir={tmp_path / run}",
            "img_size=128",
            "window=4",
            "iterations=2",
            "batch_size=2",
            "warmup_iterations=1",
            "num_workers=0",
            "precision=fp32",
            "device=cpu",
            "log_every=1",
            *extra,
        ],
    )
    return cfg, model, small, images


def test_a_few_training_iterations_and_evaluation(shared_dir, tmp_path):
    from det.train import train_detector

    cfg, model, small, images = tiny_det_run(shared_dir, tmp_path, "run")
    result = train_detector(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(x == x and x < 100 for x in losses)  # finite
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(rows[0])
    for kind in ("bbox", "segm"):
        assert set(result["metrics"][kind]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (tmp_path / "run" / "results.json").is_file()
    # the standalone evaluation of the trained checkpoint gives the same numbers
    from det.__main__ import main

    ckpt = tmp_path / "run" / "checkpoint-last.pt"
    out = tmp_path / "res.json"
    assert (
        main(
            [
                "evaluate",
                str(ckpt),
                "--json",
                str(small),
                "--images",
                str(images),
                "--results",
                str(out),
            ]
        )
        == 0
    )
    assert out.is_file()
    # the detectron2 export: the MAE release layout, which our backbone (like detectron2's) loads
    assert main(["export-d2", str(tmp_path / "enc.pt"), str(tmp_path / "d2.pth")]) == 0
    exported = torch.load(tmp_path / "d2.pth", weights_only=True)["model"]
    assert set(exported) == set(model.encoder.state_dict())
    ViTDetBackbone(**{**TINY_VIT, "img_size": 64, "window": 2}).load_pretrained(exported, (2, 2))


def test_interrupted_training_resumes_exactly(shared_dir, tmp_path, monkeypatch):
    import signal

    import det.train as dt

    def cfg(run):
        return tiny_det_run(shared_dir, tmp_path, run, "iterations=4", "drop_path_rate=0.2")[0]

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    dt.train_detector(cfg("a"))
    orig = dt.step_lr_at

    def stop_at_2(step, **kw):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return orig(step, **kw)

    monkeypatch.setattr(dt, "step_lr_at", stop_at_2)
    assert dt.train_detector(cfg("b"))["interrupted"]
    monkeypatch.setattr(dt, "step_lr_at", orig)
    dt.train_detector(cfg("b"), resume="auto")
    assert losses("b") == losses("a")  # same data, same drop-path draws, same numbers


def test_evaluation_view_keeps_crowd_only_images(shared_dir):
    ann, images = coco128(shared_dir)
    ds = CocoInstances(ann, images, train=False, img_size=256)
    crowd_only = [i for i in range(len(ds)) if all(a["iscrowd"] for a in ds.anns[ds.ids[i]])]
    assert len(ds) == 128 and crowd_only  # evaluated (COCOeval ignores the crowd regions)
    img, t = ds[crowd_only[0]]
    assert img.shape == (3, 256, 256) and t["masks"].shape == (0, 256, 256) and len(t["boxes"]) == 0
