"""det/ against detectron2 itself: ``vitdet_d2_tiny.pt`` holds what detectron2's ViTDet Mask R-CNN
(``projects/ViTDet``, float64, CPU) computed at every stage on two coco128 images, with its own
state dict. We import that state dict with ``det.d2``, build the model from the file's ``config``
and reproduce every stage. ``$CROSSMAE_D2_FIXTURE`` names another file of the same format.

Which assertion catches which deviation, were it brought back:
1. black padding normalised (instead of normalise, then pad with 0): ``input`` and the
   backbone / pyramid features of the padded ``fit`` case (test_d2_backbone_and_pyramid);
2. proposals and detections clipped to the padded canvas: the ``fit`` case's proposal boxes
   (test_d2_rpn_and_proposals) and detection boxes (test_d2_detections);
3. LayerNorm eps 1e-5 in the pyramid / heads: the pyramid features (1e-10 relative);
4. integer anchors: the anchors, compared exactly (test_d2_anchors);
5. smooth-L1 (beta 1/9) box losses, or another RPN normaliser: ``loss_rpn_loc``,
   ``loss_box_reg`` / ``loss_rpn_cls`` (test_d2_training_losses);
6. soft, unaligned RoIAlign mask targets: ``mask_targets`` and ``loss_mask`` (same test);
7. masks pasted into the padded canvas and resized: the pasted masks, pixel for pixel, and the
   COCO RLEs (test_d2_postprocess_and_coco_json);
8. a position table resampled once to the detection grid: the importer's strict load of
   detectron2's (1, 1 + 14 x 14, D) table (test_d2_import_reads_the_architecture), and the
   backbone features of both cases.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from conftest import parity_fixture

from crossmae.checkpoint import load_state_dict_strict
from det.d2 import d2_architecture, import_d2, read_d2_checkpoint
from det.data import resize_u8, shortest_edge_size
from det.evaluate import instances_to_coco_json
from det.model import PIXEL_MEAN, PIXEL_STD, ViTDetMaskRCNN, postprocess
from det.parity import (
    evaluation_stages,
    load_fixture,
    model_from_config,
    replay_training,
    training_targets,
)
from det.structures import rasterize_polygons_within_box

FIXTURE_ENV = "CROSSMAE_D2_FIXTURE"
BOX_PX = 1e-4  # detectron2 keeps boxes in float32
FEAT_REL = 1e-10


@pytest.fixture(scope="module")
def d2(request) -> dict:
    return load_fixture(parity_fixture(request, FIXTURE_ENV, "vitdet_d2_tiny.pt"))


@pytest.fixture(scope="module")
def model(d2, tmp_path_factory) -> ViTDetMaskRCNN:
    """detectron2's state dict, written as detectron2's checkpointer does and read back through
    ``python -m det import-d2``'s importer, in the model built from ``config``."""
    path = tmp_path_factory.mktemp("d2") / "model_final.pth"
    torch.save({"model": d2["state_dict"], "iteration": 0}, path)
    ck = import_d2(path)
    # our defaults are detectron2's pixel statistics (not in its state dict)
    assert d2["config"]["pixel_mean"] == list(PIXEL_MEAN)
    assert d2["config"]["pixel_std"] == list(PIXEL_STD)
    m = model_from_config(d2["config"])
    load_state_dict_strict(m, ck["model"], what="imported detectron2 model")
    return m.eval()


@pytest.fixture(scope="module")
def run(d2, model) -> dict:
    return evaluation_stages(model, d2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def test_d2_import_reads_the_architecture(d2, tmp_path):
    vit, rh = d2["config"]["vit"], d2["config"]["roi_heads"]
    arch = d2_architecture(d2["state_dict"])
    enc, det = arch["encoder"], arch["detector"]
    assert (enc["embed_dim"], enc["depth"], enc["num_heads"], enc["patch_size"]) == (
        vit["embed_dim"], vit["depth"], vit["num_heads"], vit["patch_size"])  # fmt: skip
    assert enc["img_size"] == vit["pretrain_img_size"] and enc["mlp_ratio"] == vit["mlp_ratio"]
    assert det["img_size"] == vit["img_size"] and det["window"] == vit["window_size"]
    assert det["global_blocks"] == list(vit["global_block_indexes"])
    assert det["heads"] == {
        "pyramid_channels": d2["config"]["simple_feature_pyramid"]["out_channels"],
        "box_conv_dims": rh["box_head"]["conv_dims"], "box_fc_dims": rh["box_head"]["fc_dims"],
        "mask_conv_dims": rh["mask_head"]["conv_dims"],
        "mask_deconv_dim": rh["mask_head"]["deconv_dim"],
    }  # fmt: skip
    assert arch["num_classes"] == rh["num_classes"]
    # the model zoo's .pkl (numpy arrays, read without running pickled code) gives the same tensors
    pkl = tmp_path / "model_final.pkl"
    arrays = {k: v.numpy() for k, v in d2["state_dict"].items()}
    pkl.write_bytes(pickle.dumps({"model": arrays, "__author__": "Detectron2 Model Zoo"}))
    from_pkl = read_d2_checkpoint(pkl)
    assert from_pkl.keys() == d2["state_dict"].keys()
    assert all(torch.equal(from_pkl[k], v) for k, v in d2["state_dict"].items())
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"x": os.system}}))
    with pytest.raises(ValueError, match="refusing to load"):
        read_d2_checkpoint(evil)
    # a position table of another shape (one made for the detection grid) does not load
    sd = dict(d2["state_dict"])
    sd["backbone.net.pos_embed"] = torch.zeros(1, 64, vit["embed_dim"])
    with pytest.raises(ValueError, match="pos_embed"):
        d2_architecture(sd)


def test_d2_test_resize_is_exact(d2):
    """detectron2's test mapper: ResizeShortestEdge(S, S) with PIL bilinear on uint8."""
    S = d2["config"]["input_size"]
    for case in d2["cases"]:
        orig = case["image_orig"].permute(1, 2, 0).numpy()
        size = shortest_edge_size(*orig.shape[:2], S, S)
        assert list(size) == case["image_size"], case["kind"]
        ours = torch.from_numpy(resize_u8(orig, size)).permute(2, 0, 1)
        assert torch.equal(ours, case["image"]), case["kind"]


def test_d2_backbone_and_pyramid(d2, run):
    for i, case in enumerate(d2["cases"]):
        kind = case["kind"]
        h, w = case["image_size"]
        # normalised, then zero-padded: the float32 copy of detectron2's input
        assert torch.equal(run["input"][i].float(), case["input"]), kind
        padding = torch.ones_like(run["input"][i], dtype=torch.bool)
        padding[:, :h, :w] = False
        assert torch.count_nonzero(run["input"][i][padding]) == 0, kind
        assert rel(run["backbone"][i], case["backbone"]) < FEAT_REL, kind
        for name, ref in case["pyramid"].items():
            assert rel(run["pyramid"][name][i], ref) < FEAT_REL, (kind, name)


def test_d2_anchors(d2, run):
    assert len(run["anchors"]) == len(d2["anchors"])
    for ours, ref in zip(run["anchors"], d2["anchors"], strict=True):
        assert ours.dtype == torch.float32 and torch.equal(ours, ref)


def test_d2_rpn_and_proposals(d2, run):
    for i, case in enumerate(d2["cases"]):
        kind = case["kind"]
        for lvl, (lo, de) in enumerate(zip(case["rpn_objectness_logits"],
                                           case["rpn_anchor_deltas"], strict=True)):  # fmt: skip
            assert rel(run["logits"][lvl][i], lo) < FEAT_REL, (kind, lvl)
            assert rel(run["deltas"][lvl][i], de) < 1e-6, (kind, lvl)  # stored as float32
        boxes, logits = run["proposals"][i]
        ref = case["proposals"]
        assert boxes.shape == ref["boxes"].shape, kind
        assert (boxes - ref["boxes"]).abs().max() <= BOX_PX, kind
        assert rel(logits, ref["objectness_logits"]) < FEAT_REL, kind


def test_d2_detections(d2, run):
    for i, case in enumerate(d2["cases"]):
        kind, ours, ref = case["kind"], run["detections"][i], case["instances"]
        assert torch.equal(ours["classes"], ref["pred_classes"]), kind  # same classes, same order
        assert torch.equal(ours["proposal_index"], ref["proposal_index"]), kind
        assert (ours["boxes"] - ref["pred_boxes"]).abs().max() <= BOX_PX, kind
        assert (ours["scores"] - ref["scores"]).abs().max() <= 1e-5, kind
        assert (ours["mask_probs"] - ref["pred_mask_probs"]).abs().max() <= 1e-4, kind


def unpack_masks(packed: dict) -> torch.Tensor:
    n, h, w = packed["pred_masks_shape"]
    bits = np.unpackbits(packed["pred_masks_packed"].numpy(), count=n * h * w)
    return torch.from_numpy(bits.reshape(n, h, w).astype(bool))


def test_d2_postprocess_and_coco_json(d2, run):
    for i, case in enumerate(d2["cases"]):
        kind, ref = case["kind"], case["instances_postprocessed"]
        pp = postprocess(run["detections"][i], run["sizes"][i], tuple(case["orig_size"]))
        assert torch.equal(pp["classes"], ref["pred_classes"]), kind
        assert (pp["boxes"] - ref["pred_boxes"]).abs().max() <= BOX_PX, kind
        assert (pp["scores"] - ref["scores"]).abs().max() <= 1e-5, kind
        masks = unpack_masks(ref)
        assert pp["masks"].shape == masks.shape, kind
        assert int((pp["masks"] != masks).sum()) == 0, kind  # pixel for pixel
        ours = instances_to_coco_json(pp, case["image_id"])
        assert len(ours) == len(case["coco_results"]), kind
        for a, b in zip(ours, case["coco_results"], strict=True):
            assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"]), kind
            assert a["segmentation"] == b["segmentation"], kind
            assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"], strict=True)) <= BOX_PX
            assert abs(a["score"] - b["score"]) <= 1e-5, kind


def test_d2_training_losses(d2, model):
    """One training forward on the fixture's batch, replaying the anchors and RoIs detectron2
    sampled (its ``subsample_labels`` draws with ``torch.randperm``)."""
    out = replay_training(model, d2)
    cases = [c["train"] for c in d2["cases"]]
    n = len(cases)
    for i, t in enumerate(cases):
        # the labels the samplers were given: anchor matching, then RoI matching and classes
        assert torch.equal(out["sampler_labels"][i], t["rpn_match_labels"]), i
        assert torch.equal(out["sampler_labels"][n + i], t["roi_labels_before_sampling"]), i
        boxes = out["proposals"][i]
        assert boxes.shape == t["proposals"]["boxes"].shape
        assert (boxes - t["proposals"]["boxes"]).abs().max() <= BOX_PX
        assert torch.equal(out["mask_boxes"][i], t["mask_fg_boxes"])
    # the mask targets: the ground-truth polygons rasterised inside each foreground RoI
    for t, inst in zip(cases, training_targets(d2), strict=True):
        matched = t["roi_matched_idxs"][t["roi_sampled_fg"]]
        pairs = zip(matched.tolist(), t["mask_fg_boxes"], strict=True)
        ours = torch.stack(
            [rasterize_polygons_within_box(inst.polygons[g], b.numpy(), 28) for g, b in pairs]
        )
        assert torch.equal(ours, t["mask_targets"])
    ref = d2["train"]["losses"]
    assert set(out["losses"]) == set(ref)
    for name, value in out["losses"].items():
        tol = 1e-6 if d2["train"]["loss_dtypes"][name] == "float32" else 1e-10
        assert abs(float(value) - ref[name]) <= tol * abs(ref[name]), name
    # our own sampler under detectron2's seed draws what detectron2 drew (same randperm calls)
    torch.manual_seed(d2["train"]["seed"])
    model.train()
    with torch.no_grad():
        drawn = model([c["image"] for c in d2["cases"]], training_targets(d2))
    model.eval()
    for name, value in drawn.items():
        assert float(value) == pytest.approx(ref[name], rel=1e-6), name


def test_d2_import_then_evaluate_commands(d2, shared_dir, tmp_path, capsys):
    """``python -m det import-d2`` then ``python -m det evaluate``: a detectron2 checkpoint scored
    on a COCO json (the fixture's two coco128 images, categories folded to its classes)."""
    import json

    from crossmae.cli import main as cli

    def main(argv):

        return cli(["det", *argv])

    k = d2["config"]["roi_heads"]["num_classes"]
    coco = shared_dir / "data" / "coco128"
    data = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    order = sorted(c["id"] for c in data["categories"])
    ids = {c["image_id"] for c in d2["cases"]}
    data["images"] = [im for im in data["images"] if im["id"] in ids]
    data["annotations"] = [dict(a, category_id=order.index(a["category_id"]) % k)
                           for a in data["annotations"] if a["image_id"] in ids]  # fmt: skip
    data["categories"] = [{"id": i, "name": f"class {i}"} for i in range(k)]
    ann = tmp_path / "folded.json"
    ann.write_text(json.dumps(data))
    torch.save({"model": d2["state_dict"]}, tmp_path / "d2.pth")
    assert main(["import-d2", str(tmp_path / "d2.pth"), str(tmp_path / "ours.pt"),
                 "--json", str(ann)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "ours.pt"), "--json", str(ann),
                 "--images", str(coco / "train2017")]) == 0  # fmt: skip
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) == {"bbox", "segm", "detections"}
    assert set(metrics["bbox"]) >= {"AP", "AP50", "APl"}
    # a json with another number of categories is refused, naming both counts
    assert main(["import-d2", str(tmp_path / "d2.pth"), str(tmp_path / "x.pt"), "--json",
                 str(coco / "annotations" / "instances_train2017.json")]) == 2  # fmt: skip
    assert f"{k} classes" in capsys.readouterr().err
