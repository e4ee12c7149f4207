"""det/: ViTDet backbone and pyramid, COCO data and evaluation on ../shared/data/coco128, the
detectron2 recipe (parameter groups, schedule, exports), and a few training iterations of a tiny
Mask R-CNN. The stage-by-stage comparison with detectron2 is in test_det_d2_parity.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, check_random_states, tiny_encoder_export

from crossmae.checkpoint import save_atomic, strict_json
from crossmae.models.pretrained import encoder_export, load_pretrained_encoder
from det.backbone import SimpleFeaturePyramid, ViTDetBackbone, global_block_indices, pyramid_strides
from det.data import AnnotationError, CocoInstances, coco_subset, shortest_edge_size
from det.evaluate import coco_evaluate, instances_to_coco_json

TINY_VIT = dict(patch_size=16, embed_dim=64, depth=4, num_heads=2)


def coco128(shared_dir: Path) -> tuple[Path, Path]:
    root = shared_dir / "data" / "coco128"
    return root / "annotations" / "instances_train2017.json", root / "train2017"


def test_global_block_placement():
    assert global_block_indices(12) == [2, 5, 8, 11]
    assert global_block_indices(24) == [5, 11, 17, 23]
    assert global_block_indices(32) == [7, 15, 23, 31]


def test_explicit_attention_computes_what_sdpa_computes():
    """model.attention=explicit (detectron2's arithmetic, for memory comparisons) and the
    default SDPA path are the same function; their gradients too."""
    torch.manual_seed(0)
    sdpa = ViTDetBackbone(img_size=64, window=4, global_blocks=[1, 3], **TINY_VIT)
    explicit = ViTDetBackbone(img_size=64, window=4, global_blocks=[1, 3],
                              explicit_attention=True, **TINY_VIT)  # fmt: skip
    for blk in sdpa.blocks:
        torch.nn.init.normal_(blk.attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(blk.attn.rel_pos_w, std=0.5)
    explicit.load_state_dict(sdpa.state_dict())
    sdpa.eval(), explicit.eval()  # no drop path: the same function
    x = torch.randn(2, 3, 64, 64)
    a, b = sdpa(x), explicit(x)
    assert torch.allclose(a, b, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    ga, gb = sdpa.blocks[1].attn.rel_pos_h.grad, explicit.blocks[1].attn.rel_pos_h.grad
    assert torch.allclose(ga, gb, atol=1e-4, rtol=1e-4)


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
    strides = pyramid_strides()
    for size in [(128, 192), (64, 64), (192, 64)]:  # non-square, multiples of the coarsest stride
        feats = fpn(torch.randn(1, 3, *size))
        assert list(feats) == ["p2", "p3", "p4", "p5", "p6"]
        for name, f in feats.items():
            assert f.shape[1:] == (32, size[0] // strides[name], size[1] // strides[name])


def test_backbone_loads_an_encoder_strictly(tmp_path):
    model = tiny_encoder_export(tmp_path / "enc.pt", **TINY_VIT)
    sd, cfg = load_pretrained_encoder(tmp_path / "enc.pt")
    bb = ViTDetBackbone(img_size=64, pretrain_img_size=32, window=2, **TINY_VIT)
    bb.load_pretrained(sd, (2, 2))
    assert torch.equal(bb.blocks[3].mlp.fc2.weight, model.encoder.blocks[3].mlp.fc2.weight)
    # the pretraining table, cls slot included, is kept (resampled on every forward)
    assert torch.equal(bb.pos_embed, model.encoder.pos_embed)
    with pytest.raises(KeyError, match="blocks.0.attn.qkv.bias"):
        bb.load_pretrained({k: v for k, v in sd.items() if k != "blocks.0.attn.qkv.bias"}, (2, 2))


@pytest.mark.slow
def test_ground_truth_as_predictions_scores_ap_100(shared_dir):
    from pycocotools.coco import COCO

    ann, _ = coco128(shared_dir)
    gt = COCO(str(ann))
    ds_cats = sorted(gt.getCatIds())
    results = []
    for image_id in gt.getImgIds():
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
        if not anns:
            continue
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        pred = {  # detections as postprocess gives them: XYXY boxes, classes, pasted masks
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "scores": torch.ones(len(anns), dtype=torch.float64),
            "classes": torch.tensor([ds_cats.index(a["category_id"]) for a in anns]),
            "masks": torch.from_numpy(np.stack([gt.annToMask(a) for a in anns]).astype(bool)),
        }
        for r in instances_to_coco_json(pred, image_id):
            r["category_id"] = ds_cats[r["category_id"]]
            results.append(r)
    metrics = coco_evaluate(ann, results)
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)
    assert metrics["segm"]["AP"] == pytest.approx(100.0)
    # and a prediction that misses half the objects does not
    assert coco_evaluate(ann, results[::2])["bbox"]["AP"] < 90
    # no results at all: NaN, as detectron2 reports it
    assert all(v != v for v in coco_evaluate(ann, [])["segm"].values())
    # scored on some images only (data.image_ids): the others' objects are not missed
    some = sorted({r["image_id"] for r in results})[:3]
    mine = [r for r in results if r["image_id"] in some]
    assert coco_evaluate(ann, mine, ("bbox",), image_ids=some)["bbox"]["AP"] == pytest.approx(100)
    assert coco_evaluate(ann, mine, ("bbox",))["bbox"]["AP"] < 50


def test_a_subset_of_images_by_id(shared_dir):
    ann, images = coco128(shared_dir)
    for train in (True, False):
        ds = CocoInstances(ann, images, train=train, img_size=128, image_ids=[42, 9, 30])
        assert ds.ids == [9, 30, 42] and set(ds.anns) == {9, 30, 42}
    assert ds[1][1]["image_id"] == 30
    with pytest.raises(
        AnnotationError, match=r"no image with id 7 \(and 1 more\) among its images"
    ):
        CocoInstances(ann, images, train=True, image_ids=[9, 7, 8])


def test_training_view_large_scale_jitter(shared_dir):
    from det.structures import polygon_boxes

    ann, images = coco128(shared_dir)
    ds = CocoInstances(ann, images, train=True, img_size=256)
    assert len(ds) == 126  # 2 of the 128 images have no non-crowd annotation
    for key in [(5, 123), (7, 1), (40, 9)]:
        img, t = ds[key]
        assert img.dtype == torch.uint8 and img.shape[0] == 3 and max(img.shape[1:]) <= 256
        assert len(t.boxes) == len(t.classes) == len(t.polygons)
        assert t.classes.min() >= 0 and t.classes.max() < ds.num_classes
        # boxes are the tight boxes of the cropped polygons, which lie inside the crop
        assert torch.equal(t.boxes, polygon_boxes(t.polygons))
        h, w = img.shape[1:]
        assert t.boxes[:, 0::2].max() <= w and t.boxes[:, 1::2].max() <= h
        assert t.boxes.min() >= 0
    # the same key gives the same sample (resumable), another seed another one
    assert torch.equal(ds[(5, 123)][0], ds[(5, 123)][0])
    assert ds[(5, 123)][0].shape != ds[(5, 124)][0].shape or not torch.equal(
        ds[(5, 123)][0], ds[(5, 124)][0]
    )


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
            f"data.train_json={small}",
            f"data.train_images={images}",
            f"data.val_json={small}",
            f"data.val_images={images}",
            f"output_dir={tmp_path / run}",
            "model.img_size=128",
            "model.window=4",
            "model.heads.pyramid_channels=16",
            "model.heads.box_conv_dims=[16]",
            "model.heads.box_fc_dims=[32]",
            "model.heads.mask_conv_dims=[16]",
            "model.heads.mask_deconv_dim=16",
            "train.steps=2",
            "train.batch_size=2",
            "optim.warmup_steps=1",
            "data.num_workers=0",
            "train.precision=fp32",
            "train.device=cpu",
            "log.every_steps=1",
            *extra,
        ],
    )
    return cfg, model, small, images


def train_detector(cfg, resume: str | None = None) -> dict:
    """``crossmae det train`` through the runner."""
    from crossmae.runner import run_task
    from det.task import DetTask

    return run_task(DetTask(cfg), cfg, resume)


@pytest.mark.slow
def test_a_few_training_iterations_and_evaluation(shared_dir, tmp_path, capsys):
    cfg, model, small, images = tiny_det_run(shared_dir, tmp_path, "run")
    result = train_detector(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(x == x and x < 100 for x in losses)  # finite
    assert {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"} <= set(rows[0])
    for kind in ("bbox", "segm"):
        assert set(result["metrics"][kind]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (tmp_path / "run" / "results.json").is_file()
    # the standalone evaluation of the trained checkpoint gives the same numbers
    from crossmae.cli import main as cli

    def main(argv):
        return cli(["det", *argv])

    ckpt = tmp_path / "run" / "checkpoint-last.pt"
    out = tmp_path / "res.json"
    capsys.readouterr()
    args = ["evaluate", str(ckpt), "--json", str(small), "--images", str(images)]
    assert main([*args, "--results", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    same = {k: result["metrics"][k] for k in ("bbox", "segm", "detections")}
    assert printed[-1] == strict_json(same)  # null where AP is undefined
    text = "\n".join(printed)
    assert "no detection scored above" in text or "Per-category bbox AP:" in text
    assert out.is_file()
    # the detectron2 export: the MAE release layout, which our backbone (like detectron2's) loads
    assert cli(["convert", "to-mae", str(tmp_path / "enc.pt"), str(tmp_path / "d2.pth")]) == 0
    exported = torch.load(tmp_path / "d2.pth", weights_only=True)["model"]
    assert set(exported) == set(model.encoder.state_dict())
    ViTDetBackbone(img_size=64, pretrain_img_size=32, window=2, **TINY_VIT).load_pretrained(
        exported, (2, 2)
    )


@pytest.mark.slow
def test_interrupted_training_resumes_exactly(shared_dir, tmp_path, monkeypatch):
    import signal

    from crossmae import optim

    def cfg(run):
        return tiny_det_run(shared_dir, tmp_path, run, "train.steps=4", "model.drop_path_rate=0.2")[
            0
        ]

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    train_detector(cfg("a"))
    orig = optim.SCHEDULES["multistep"]

    def stop_at_2(step, **kw):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return orig(step, **kw)

    monkeypatch.setitem(optim.SCHEDULES, "multistep", stop_at_2)
    assert train_detector(cfg("b"))["interrupted"]
    monkeypatch.setitem(optim.SCHEDULES, "multistep", orig)
    check_random_states(tmp_path / "b" / "checkpoint-last.pt")
    train_detector(cfg("b"), resume="auto")
    assert losses("b") == losses("a")  # same data, same drop-path draws, same numbers


def test_evaluation_view_keeps_crowd_only_images(shared_dir):
    ann, images = coco128(shared_dir)
    ds = CocoInstances(ann, images, train=False, img_size=256)
    crowd_only = [i for i in range(len(ds)) if all(a["iscrowd"] for a in ds.anns[ds.ids[i]])]
    assert len(ds) == 128 and crowd_only  # evaluated (COCOeval ignores the crowd regions)
    img, info = ds[crowd_only[0]]
    assert img.dtype == torch.uint8
    assert tuple(img.shape[1:]) == shortest_edge_size(*info["orig_size"], 256, 256)


def test_export_d2_of_vit_huge_has_the_shapes_detectron2s_h_config_loads(tmp_path):
    """detectron2's mask_rcnn_vitdet_h_75ep.py builds ViT(embed 1280, patch 16,
    pretrain_img_size 224) and loads mae_pretrain_vit_huge_p14to16.pth: a 16-px kernel and a
    14 x 14 (+ cls) position table. Our ViT-H/14 export must have exactly those shapes."""
    from crossmae.cli import main as cli
    from crossmae.models import create_model

    def main(argv):
        return cli(["det", *argv])

    torch.manual_seed(0)
    model = create_model("mae_vit_huge_patch14", depth=1, decoder_depth=1)  # H widths, 1 block
    save_atomic(encoder_export(model, model_name="mae_vit_huge_patch14"), tmp_path / "h.pt")
    assert cli(["convert", "to-mae", str(tmp_path / "h.pt"), str(tmp_path / "h_d2.pth")]) == 0
    sd = torch.load(tmp_path / "h_d2.pth", weights_only=True)["model"]
    assert sd["patch_embed.proj.weight"].shape == (1280, 3, 16, 16)
    assert sd["pos_embed"].shape == (1, 1 + 14 * 14, 1280)
    # every tensor detectron2's ViT (our backbone mirrors it) has, at its shape
    d2_vit = ViTDetBackbone(img_size=1024, pretrain_img_size=224, patch_size=16, embed_dim=1280,
                            depth=1, num_heads=16, global_blocks=[0])  # fmt: skip
    own = {k: v.shape for k, v in d2_vit.state_dict().items() if ".rel_pos_" not in k}
    assert {k: v.shape for k, v in sd.items() if k in own} == own
    assert set(sd) - set(own) == {"cls_token", "norm.weight", "norm.bias"}  # skipped by it
    # the resampled kernel (FlexiViT's pseudo-inverse) responds to a 14-px patch upsampled to
    # 16 px as the 14-px kernel responds to the patch itself
    x = torch.rand(1, 3, 14, 14)
    y = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    a = (model.encoder.patch_embed.proj.weight.detach() * x).sum(dim=(1, 2, 3))
    b = (sd["patch_embed.proj.weight"] * y).sum(dim=(1, 2, 3))
    assert torch.allclose(a, b, atol=1e-4 * float(a.abs().max()))


def test_detectron2_parameter_groups():
    """detectron2's get_default_optimizer_params + get_vit_lr_decay_rate as ViTDet sets them:
    B / L decay everything but the ViT's nn.LayerNorms and pos_embed; H decays everything."""
    from crossmae.config import load_config
    from crossmae.optim import optimizer_groups
    from det.config import DetConfig
    from det.model import build_detector

    enc = dict(img_size=32, patch_size=16, embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0,
               norm_eps=1e-6)  # fmt: skip
    small = ["model.img_size=64", "model.window=2", "model.heads.pyramid_channels=16",
             "model.heads.box_conv_dims=[16]",
             "model.heads.box_fc_dims=[16]", "model.heads.mask_conv_dims=[16]",
             "model.heads.mask_deconv_dim=16"]  # fmt: skip
    huge = ["configs/det/mask_rcnn_vit_huge_75ep.yaml"]
    for files, vit_norm_wd, pos_wd in (([], 0.0, 0.0), (huge, 0.1, 0.1)):
        cfg = load_config(DetConfig, [REPO / f for f in files], small)
        model = build_detector(cfg.model, 3, enc)
        wd, scale = {}, {}
        for g in optimizer_groups(model, cfg.optim):
            for n in g["names"]:
                wd[n], scale[n] = g["weight_decay"], g["lr_scale"]
        assert wd["backbone.net.blocks.0.norm1.weight"] == vit_norm_wd
        assert wd["backbone.net.pos_embed"] == pos_wd
        for name in ("backbone.net.blocks.0.attn.qkv.bias", "backbone.simfp_2.1.weight",
                     "backbone.simfp_4.0.norm.bias", "roi_heads.box_head.conv1.norm.weight",
                     "roi_heads.box_predictor.cls_score.bias",
                     "backbone.net.blocks.1.attn.rel_pos_h"):  # fmt: skip
            assert wd[name] == 0.1, name
        d = cfg.optim.layer_decay
        assert scale["backbone.net.patch_embed.proj.weight"] == pytest.approx(d**5)
        assert scale["backbone.net.blocks.2.mlp.fc1.weight"] == pytest.approx(d**2)
        assert (
            scale["backbone.simfp_3.0.weight"] == scale["roi_heads.mask_head.predictor.bias"] == 1
        )


def test_det_configs_follow_detectron2():
    """Every shipped det config loads; the schedules are detectron2's ViTDet ones."""
    from crossmae.config import load_config
    from det.config import DetConfig

    files = sorted((REPO / "configs" / "det").glob("*.yaml"))
    assert len(files) >= 4
    cfgs = {f.stem: load_config(DetConfig, [f]) for f in files}
    b, h = cfgs["mask_rcnn_vit_base_100ep"], cfgs["mask_rcnn_vit_huge_75ep"]
    assert (b.train.steps, list(b.optim.milestones)) == (184375, [163889, 177546])
    # the H config is 75 epochs: 3/4 of the steps and milestones, integer-divided
    assert h.train.steps == b.train.steps * 3 // 4
    assert list(h.optim.milestones) == [m * 3 // 4 for m in b.optim.milestones]
    assert (h.optim.layer_decay, h.model.drop_path_rate, h.model.patch_size) == (0.9, 0.5, 16)
    assert cfgs["mask_rcnn_vit_large_100ep"].optim.layer_decay == 0.8


def test_nms_keeps_box_precision_under_fp16_scores():
    """Autocast gives fp16 logits: NMS must still compare the float32 boxes (two boxes 0.2 px
    apart near x = 1000 are one box in fp16)."""
    from det.structures import batched_nms

    boxes = torch.tensor([[1000.3, 0, 1010.7, 10], [1000.4, 0, 1010.6, 10.0]])
    scores = torch.tensor([0.9, 0.8], dtype=torch.float16)
    assert batched_nms(boxes, scores, torch.zeros(2, dtype=torch.long), 0.99).tolist() == [0, 1]


def test_an_empty_prediction_panel_says_the_highest_score_reached():
    from det.visualize import prediction_title

    scores = torch.tensor([0.031, 0.2, 0.6])
    assert prediction_title(scores, 1, 0.5) == "prediction (1 with score >= 0.5)"
    assert prediction_title(scores[:2], 0, 0.5) == (
        "prediction (none with score >= 0.5; highest score 0.200)")  # fmt: skip
    assert prediction_title(scores[:1], 0, 0.05) == (
        "prediction (none with score >= 0.05; highest score 0.031)")  # fmt: skip
    assert prediction_title(torch.zeros(0), 0, 0.5) == "prediction (no detection at all)"
