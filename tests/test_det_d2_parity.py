"""det/ against detectron2 itself: ``vitdet_d2_tiny.pt`` holds what detectron2's ViTDet Mask R-CNN
(``projects/ViTDet``, float64, CPU) computed at every stage on two coco128 images, with its own
state dict. We import that state dict with ``det.d2``, build the model from the file's ``config``
and reproduce every stage. ``$CROSSMAE_D2_FIXTURE`` names another file of the same format.

The file was written on another CPU (see ``spread.py``). detectron2 keeps anchors, boxes, IoU
matching and box decoding in float32 even in a float64 model, and the last bits of that float32
work (``exp`` and ``log`` in box decoding above all) depend on the CPU's vector units. detectron2
itself, re-run at the fixture's commit on an Intel Xeon (AVX-512) against a file written on an
AMD EPYC, differs from the file by: training losses 1e-8 relative, proposals and sampled boxes
2.3e-5 px, detected boxes 7.6e-6 px, pasted boxes 1.5e-5 px, scores 2.8e-8, mask probabilities
1.8e-6; every discrete outcome the same. Each tolerance below covers that spread with a margin,
and also what ``test_d2_parity_holds_on_a_cpu_with_other_float32_exp_and_log`` emulates (every
float32 exp / log result moved by up to one ulp: at most 1.33 float32 units on boxes, 9.8e-7 on
scores, 7e-6 on mask probabilities, 7.6e-8 relative on losses, over ten draws).
``test_d2_perturbed_fixture_fails`` shows that they still catch a score off by 1 % or a box off
by half a pixel.

Which assertion catches which deviation, were it brought back:
1. black padding normalised (instead of normalise, then pad with 0): ``input`` and the
   backbone / pyramid features of the padded ``fit`` case (check_backbone_and_pyramid);
2. proposals and detections clipped to the padded canvas: the ``fit`` case's proposal boxes
   (check_rpn_and_proposals) and detection boxes (check_detections);
3. LayerNorm eps 1e-5 in the pyramid / heads: the pyramid features (1e-10 relative);
4. integer anchors: the anchors (0.5 px off where 4 float32 units are allowed; check_anchors);
5. smooth-L1 (beta 1/9) box losses, or another RPN normaliser: ``loss_rpn_loc``,
   ``loss_box_reg`` / ``loss_rpn_cls`` (check_training);
6. soft, unaligned RoIAlign mask targets: ``mask_targets`` and ``loss_mask`` (same check);
7. masks pasted into the padded canvas and resized: the pasted masks, pixel for pixel away from
   the 0.5 threshold, and the COCO RLEs (check_postprocess_and_coco_json);
8. a position table resampled once to the detection grid: the importer's strict load of
   detectron2's (1, 1 + 14 x 14, D) table (test_d2_import_reads_the_architecture), and the
   backbone features of both cases.
"""

from __future__ import annotations

import copy
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import parity_fixture
from pycocotools import mask as mask_utils
from spread import (
    F32_EPS,
    assert_abs_close,
    assert_equal_except_near_ties,
    assert_float32_close,
    assert_rel_close,
    iou_spread,
)

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
from det.structures import (
    clip_boxes,
    nonempty,
    pairwise_iou,
    paste_masks_in_image,
    rasterize_polygons_within_box,
)

FIXTURE_ENV = "CROSSMAE_D2_FIXTURE"

# float32 boxes (anchors, proposals, sampled, detected and pasted boxes), in float32 units at the
# tensor's magnitude: detectron2's own spread is 1.5 units (2.3e-5 px at 128 px)
BOX_UNITS = 4
# float64 values computed from float32 boxes through RoIAlign inherit the boxes' spread, scaled
# by how fast they change with a sampling point: class scores (7 x 7 samples per RoI, averaged
# through the box head) by 2.8e-8 on detectron2's own re-run, so 16 float32 ulps at 1 (1.9e-6)
SCORE_ABS = 16 * F32_EPS
# mask probabilities: 28 x 28 outputs each resting on a few samples of a 14 x 14 grid, less
# averaged: 1.8e-6 on detectron2's re-run, so 128 float32 ulps at 1 (1.5e-5)
MASK_ABS = 128 * F32_EPS
# float64 losses inherit the float32 boxes (regression targets, RoIAlign of the sampled boxes):
# 1e-8 relative on detectron2's re-run
LOSS64_REL = 2e-7
# float32 losses (binary cross entropy with float32 targets): a float32 mean over thousands of
# terms, summed in an order that follows the vector width: 8 float32 ulps relative
LOSS32_REL = 8 * F32_EPS
# float64 features and logits: nothing float32 comes before them (the input is exact, below), so
# only float64 rounding differs between CPUs (~1e-15); 1e-10 still catches an eps of 1e-5
FEAT_REL = 1e-10
# the RPN deltas are stored as float32 copies of float64 values: half a float32 ulp, relative
DELTA_REL = 1e-6


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


@pytest.fixture(scope="module")
def train(d2, model) -> dict:
    return replay_training(model, d2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def box_delta(boxes: torch.Tensor) -> float:
    """The box tolerance in pixels at these boxes' magnitude."""
    return BOX_UNITS * F32_EPS * float(boxes.abs().max()) if boxes.numel() else 0.0


# ----------------------------------------------------------------------------- the checks
# Each raises AssertionError naming what differs; the tests run them on our run, on our run under
# another CPU's float32 exp / log (emulated), and against perturbed copies of the fixture.


def check_backbone_and_pyramid(d2: dict, run: dict) -> None:
    for i, case in enumerate(d2["cases"]):
        kind = case["kind"]
        h, w = case["image_size"]
        # normalised, then zero-padded: the float32 copy of detectron2's input. (x - mean) / std
        # is two correctly rounded float64 operations, the same on every IEEE-754 CPU; one
        # float32 unit still allows a library that divides by multiplying with 1 / std
        assert_float32_close(run["input"][i].float(), case["input"], 1, f"{kind} input")
        padding = torch.ones_like(run["input"][i], dtype=torch.bool)
        padding[:, :h, :w] = False
        assert torch.count_nonzero(run["input"][i][padding]) == 0, kind  # same run: exact
        assert rel(run["backbone"][i], case["backbone"]) < FEAT_REL, kind
        for name, ref in case["pyramid"].items():
            assert rel(run["pyramid"][name][i], ref) < FEAT_REL, (kind, name)


def check_anchors(d2: dict, run: dict) -> None:
    assert len(run["anchors"]) == len(d2["anchors"])
    for lvl, (ours, ref) in enumerate(zip(run["anchors"], d2["anchors"], strict=True)):
        assert ours.dtype == torch.float32, lvl
        assert_float32_close(ours, ref, BOX_UNITS, f"anchors of level {lvl}")


def check_rpn_and_proposals(d2: dict, run: dict) -> None:
    for i, case in enumerate(d2["cases"]):
        kind = case["kind"]
        for lvl, (lo, de) in enumerate(zip(case["rpn_objectness_logits"],
                                           case["rpn_anchor_deltas"], strict=True)):  # fmt: skip
            assert rel(run["logits"][lvl][i], lo) < FEAT_REL, (kind, lvl)
            assert rel(run["deltas"][lvl][i], de) < DELTA_REL, (kind, lvl)
        boxes, logits = run["proposals"][i]
        ref = case["proposals"]
        # which proposals survive NMS (IoU 0.7) is compared exactly: no near-tie has flipped
        # on any CPU measured, nor under the emulated exp / log
        assert_float32_close(boxes, ref["boxes"], BOX_UNITS, f"{kind} proposals")
        assert rel(logits, ref["objectness_logits"]) < FEAT_REL, kind


def detection_keys(d: dict, classes: str) -> list[tuple[int, int]]:
    return list(zip(d["proposal_index"].tolist(), d[classes].tolist(), strict=True))


def near_tie_detection(side: dict, j: int, other: dict, other_classes: str, rh: dict) -> bool:
    """Detection ``j`` of one side is missing from the other because of a near-tie: its score
    within SCORE_ABS of the score threshold, or of the last score of a full list; or its IoU with
    a kept box of its class and at least its score, on the other side, within the IoU's spread
    of the NMS threshold."""
    s = float(side["scores"][j])
    if abs(s - rh["test_score_thresh"]) <= SCORE_ABS:
        return True
    full = len(other["scores"]) >= rh["test_topk_per_image"]
    if full and abs(s - float(other["scores"].min())) <= SCORE_ABS:
        return True
    cls = int(side["classes" if "classes" in side else "pred_classes"][j])
    rival = (other[other_classes] == cls) & (other["scores"] >= s - SCORE_ABS)
    if not rival.any():
        return False
    box, rivals = side_boxes(side)[j : j + 1], side_boxes(other)[rival]
    iou = pairwise_iou(box, rivals)
    spread = iou_spread(box, rivals, box_delta(torch.cat([box, rivals])))
    return bool(((iou - rh["test_nms_thresh"]).abs() <= spread).any())


def side_boxes(d: dict) -> torch.Tensor:
    return d["boxes"] if "boxes" in d else d["pred_boxes"]


def match_detections(ours: dict, ref: dict, rh: dict, kind: str) -> list[tuple[int, int]]:
    """(our index, reference index) of the same detections (same proposal, same class), in the
    reference's order. A detection on one side only must be a near-tie (``near_tie_detection``);
    the common ones come in the same order, but for neighbours whose scores are within SCORE_ABS
    (sorting may break such a tie the other way)."""
    ko, kr = detection_keys(ours, "classes"), detection_keys(ref, "pred_classes")
    in_ours, in_ref = {k: j for j, k in enumerate(ko)}, set(kr)
    for side, keys, other, others, oc, name in (
        (ours, ko, ref, in_ref, "pred_classes", "ours"),
        (ref, kr, ours, in_ours, "classes", "the reference's"),
    ):
        for j, k in enumerate(keys):
            assert k in others or near_tie_detection(side, j, other, oc, rh), (
                f"{kind}: detection (proposal {k[0]}, class {k[1]}, score "
                f"{float(side['scores'][j]):.6g}) is only in {name}, and not a near-tie"
            )
    common_o = [k for k in ko if k in in_ref]
    common_r = [k for k in kr if k in in_ours]
    score = {k: float(ours["scores"][j]) for k, j in in_ours.items()}
    for a, b in zip(common_o, common_r, strict=True):
        assert a == b or abs(score[a] - score[b]) <= SCORE_ABS, (
            f"{kind}: detections in another order ({a} where the reference has {b})"
        )
    return [(in_ours[k], j) for j, k in enumerate(kr) if k in in_ours]


def check_detections(d2: dict, run: dict) -> list[list[tuple[int, int]]]:
    """Same detections (classes, proposals, order) up to near-ties; boxes, scores and mask
    probabilities within their spread. Returns the pairs of each case."""
    rh = d2["config"]["roi_heads"]
    pairs = []
    for i, case in enumerate(d2["cases"]):
        kind, ours, ref = case["kind"], run["detections"][i], case["instances"]
        pair = match_detections(ours, ref, rh, kind)
        o, r = (torch.tensor([p[k] for p in pair], dtype=torch.long) for k in (0, 1))
        assert_float32_close(ours["boxes"][o], ref["pred_boxes"][r], BOX_UNITS, f"{kind} boxes")
        assert_abs_close(ours["scores"][o], ref["scores"][r], SCORE_ABS, f"{kind} scores")
        assert_abs_close(ours["mask_probs"][o], ref["pred_mask_probs"][r], MASK_ABS,
                         f"{kind} mask probabilities")  # fmt: skip
        pairs.append(pair)
    return pairs


def unpack_masks(packed: dict) -> torch.Tensor:
    n, h, w = packed["pred_masks_shape"]
    bits = np.unpackbits(packed["pred_masks_packed"].numpy(), count=n * h * w)
    return torch.from_numpy(bits.reshape(n, h, w).astype(bool))


def kept_rows(boxes: torch.Tensor, size: tuple[int, int], orig: tuple[int, int]) -> torch.Tensor:
    """The row of each detection in ``detector_postprocess``'s output (-1: dropped as empty)."""
    (h, w), (H0, W0) = size, orig
    scaled = boxes.clone()
    scaled[:, 0::2] *= W0 / w
    scaled[:, 1::2] *= H0 / h
    keep = nonempty(clip_boxes(scaled, orig))
    return torch.where(keep, keep.long().cumsum(0) - 1, -1)


def pasted_near_ties(probs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]):
    """(N, H0, W0): pixels whose pasted probability lies within its spread of the 0.5
    threshold. Bilinear pasting reads the 28 x 28 mask at u = (x + 0.5 - x0) / (x1 - x0) * 28
    - 0.5, which moves by at most 2 * 28 * delta / w when every box coordinate moves by delta,
    and neighbouring probabilities differ by at most 1; the probabilities add MASK_ABS."""
    soft = paste_masks_in_image(probs, boxes, size, threshold=None)
    m, delta = probs.shape[-1], box_delta(boxes)
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)
    spread = MASK_ABS + 2 * m * delta * (1 / w + 1 / h)  # (N,)
    return (soft - 0.5).abs() <= spread[:, None, None]


def check_postprocess_and_coco_json(d2: dict, run: dict, pairs: list) -> None:
    for i, case in enumerate(d2["cases"]):
        kind, ref = case["kind"], case["instances_postprocessed"]
        orig, size, dets = tuple(case["orig_size"]), run["sizes"][i], run["detections"][i]
        pp = postprocess(dets, size, orig)
        row_o = kept_rows(dets["boxes"], size, orig)
        row_r = kept_rows(case["instances"]["pred_boxes"], size, orig)
        both = [(int(row_o[o]), int(row_r[r])) for o, r in pairs[i] if row_o[o] >= 0]
        assert all(b >= 0 for _, b in both), f"{kind}: an empty box on one side only"
        o, r = (torch.tensor([p[k] for p in both], dtype=torch.long) for k in (0, 1))
        assert torch.equal(pp["classes"][o], ref["pred_classes"][r]), kind
        assert_float32_close(pp["boxes"][o], ref["pred_boxes"][r], BOX_UNITS, f"{kind} boxes")
        assert_abs_close(pp["scores"][o], ref["scores"][r], SCORE_ABS, f"{kind} scores")
        masks = unpack_masks(ref)[r]
        ties = pasted_near_ties(dets["mask_probs"][row_o >= 0][o], pp["boxes"][o], orig)
        flipped = assert_equal_except_near_ties(pp["masks"][o], masks, ties, f"{kind} masks")
        ours = instances_to_coco_json(pp, case["image_id"])
        theirs = [case["coco_results"][j] for j in r.tolist()]
        for a, b in zip([ours[j] for j in o.tolist()], theirs, strict=True):
            assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"]), kind
            assert a["segmentation"]["size"] == b["segmentation"]["size"], kind
            if not flipped:  # the same pixels: the same run-length string
                assert a["segmentation"] == b["segmentation"], kind
            # XYWH: a width is the difference of two coordinates, each within the tolerance
            assert_float32_close(torch.tensor(a["bbox"]), torch.tensor(b["bbox"]),
                                 2 * BOX_UNITS, f"{kind} COCO bbox")  # fmt: skip
            assert abs(a["score"] - b["score"]) <= SCORE_ABS, kind
        # each of our RLEs is our mask (same run: exact)
        for a, m in zip(ours, pp["masks"], strict=True):
            assert np.array_equal(mask_utils.decode(a["segmentation"]), m.numpy()), kind


def roi_label_near_ties(boxes: torch.Tensor, gt: torch.Tensor, fg_iou: float) -> torch.Tensor:
    """RoIs whose class before sampling another CPU may decide otherwise: an IoU with a ground
    truth box within its spread of the foreground threshold, or, for a foreground RoI (whose
    class is its best match's), two ground truths within their spread of each other for the
    best match."""
    if len(gt) == 0:
        return torch.zeros(len(boxes), dtype=torch.bool)
    iou = pairwise_iou(gt, boxes)  # (G, R)
    spread = iou_spread(gt, boxes, box_delta(torch.cat([gt, boxes])))
    near = ((iou - fg_iou).abs() <= spread).any(dim=0)
    if len(gt) > 1:
        top, reach = iou.topk(2, dim=0).values, spread.max(dim=0).values
        near |= (top[0] >= fg_iou - reach) & (top[0] - top[1] <= 2 * reach)
    return near


def check_training(d2: dict, train: dict) -> None:
    """One training forward on the fixture's batch, replaying the anchors and RoIs detectron2
    sampled (its ``subsample_labels`` draws with ``torch.randperm``)."""
    cases = [c["train"] for c in d2["cases"]]
    n = len(cases)
    fg_iou = d2["config"]["roi_heads"]["iou_thresholds"][0]
    for i, t in enumerate(cases):
        # the labels the samplers were given. Anchor matching reads the anchors and the
        # fixture's float32 ground truth through correctly rounded operations only (no exp, no
        # sums): the same on every IEEE-754 CPU, so compared exactly, exact ties included
        # (allow_low_quality_matches labels every tied best anchor)
        assert torch.equal(train["sampler_labels"][i], t["rpn_match_labels"]), i
        boxes = train["proposals"][i]
        assert_float32_close(boxes, t["proposals"]["boxes"], BOX_UNITS, f"training proposals {i}")
        # RoI matching reads the proposals, decoded with exp: exact but for near-ties
        rois = torch.cat([boxes, t["gt_boxes"]])
        assert_equal_except_near_ties(
            train["sampler_labels"][n + i], t["roi_labels_before_sampling"],
            roi_label_near_ties(rois, t["gt_boxes"], fg_iou), f"RoI labels {i}",
        )  # fmt: skip
        assert_float32_close(train["mask_boxes"][i], t["mask_fg_boxes"], BOX_UNITS,
                             f"mask RoIs {i}")  # fmt: skip
    # the mask targets: the ground-truth polygons rasterised inside each foreground RoI of the
    # file. float64 numpy arithmetic on the file's boxes, then pycocotools' integer rasteriser:
    # the same on every CPU, so exact
    for t, inst in zip(cases, training_targets(d2), strict=True):
        matched = t["roi_matched_idxs"][t["roi_sampled_fg"]]
        pairs = zip(matched.tolist(), t["mask_fg_boxes"], strict=True)
        ours = torch.from_numpy(
            np.stack(
                [rasterize_polygons_within_box(inst.polygons[g], b.numpy(), 28) for g, b in pairs]
            )  # fmt: skip
        )
        assert torch.equal(ours, t["mask_targets"])
    check_losses(d2, train["losses"])


def check_losses(d2: dict, losses: dict) -> None:
    ref = d2["train"]["losses"]
    assert set(losses) == set(ref)
    for name, value in losses.items():
        tol = LOSS32_REL if d2["train"]["loss_dtypes"][name] == "float32" else LOSS64_REL
        assert_rel_close(value, ref[name], tol, name)


# ----------------------------------------------------------------------------- the tests


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
    """detectron2's test mapper: ResizeShortestEdge(S, S) with PIL bilinear on uint8. PIL
    resamples 8-bit images in fixed-point integer arithmetic: the same bytes on every CPU."""
    S = d2["config"]["input_size"]
    for case in d2["cases"]:
        orig = case["image_orig"].permute(1, 2, 0).numpy()
        size = shortest_edge_size(*orig.shape[:2], S, S)
        assert list(size) == case["image_size"], case["kind"]
        ours = torch.from_numpy(resize_u8(orig, size)).permute(2, 0, 1)
        assert torch.equal(ours, case["image"]), case["kind"]


def test_d2_backbone_and_pyramid(d2, run):
    check_backbone_and_pyramid(d2, run)


def test_d2_anchors(d2, run):
    check_anchors(d2, run)


def test_d2_rpn_and_proposals(d2, run):
    check_rpn_and_proposals(d2, run)


def test_d2_detections_postprocess_and_coco_json(d2, run):
    pairs = check_detections(d2, run)
    check_postprocess_and_coco_json(d2, run, pairs)


def test_d2_training_losses(d2, model, train):
    check_training(d2, train)
    # our own sampler under detectron2's seed draws what detectron2 drew (same randperm calls)
    torch.manual_seed(d2["train"]["seed"])
    model.train()
    with torch.no_grad():
        drawn = model([c["image"] for c in d2["cases"]], training_targets(d2))
    model.eval()
    check_losses(d2, drawn)


def test_d2_parity_holds_on_a_cpu_with_other_float32_exp_and_log(d2, model, monkeypatch):
    """Another CPU emulated: every float32 ``exp`` and ``log`` result (box decoding and
    encoding) moved by one ulp up or down, or left, at random. A float32 exp or log within one
    ulp of the true value (as vectorised math libraries are) differs from ours by at most that;
    every check must still pass."""
    exp, log = torch.exp, torch.log
    gen = torch.Generator().manual_seed(0)

    def jitter(f):
        def g(x, *args, **kwargs):
            y = f(x, *args, **kwargs)
            if y.dtype != torch.float32:
                return y
            step = torch.randint(-1, 2, y.shape, generator=gen)
            inf = torch.full_like(y, float("inf"))
            return torch.where(step == 0, y, torch.nextafter(y, inf * step))

        return g

    monkeypatch.setattr(torch, "exp", jitter(exp))
    monkeypatch.setattr(torch, "log", jitter(log))
    run, train = evaluation_stages(model, d2), replay_training(model, d2)
    monkeypatch.undo()
    check_training(d2, train)
    check_anchors(d2, run)
    check_rpn_and_proposals(d2, run)
    check_postprocess_and_coco_json(d2, run, check_detections(d2, run))
    # the emulation did move the float32 boxes
    assert not torch.equal(run["proposals"][0][0], d2["cases"][0]["proposals"]["boxes"])


def test_d2_only_near_ties_may_come_out_otherwise():
    """The rule the detection comparison follows, on made-up detections: one side may have a
    detection the other lacks only at a near-tie (score at the threshold, IoU at the NMS
    threshold with a kept box of its class), and neighbours may swap only at equal scores."""
    rh = {"test_score_thresh": 0.05, "test_topk_per_image": 100, "test_nms_thresh": 0.5}
    ref = {
        "pred_boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 60, 60]]),
        "scores": torch.tensor([0.9, 0.6, 0.6], dtype=torch.float64),
        "pred_classes": torch.tensor([1, 2, 3]),
        "proposal_index": torch.tensor([0, 1, 2]),
    }

    def ours(extra_box, extra_score, extra_class=1, order=(0, 1, 2)):
        o = list(order)
        return {
            "boxes": torch.cat([ref["pred_boxes"][o], torch.tensor([extra_box])]),
            "scores": torch.cat(
                [ref["scores"][o], torch.tensor([extra_score], dtype=torch.float64)]
            ),
            "classes": torch.cat([ref["pred_classes"][o], torch.tensor([extra_class])]),
            "proposal_index": torch.cat([ref["proposal_index"][o], torch.tensor([7])]),
        }

    # a score at the threshold, within the spread
    pairs = match_detections(ours([70.0, 70, 80, 80], 0.05 + 1e-7), ref, rh, "made up")
    assert pairs == [(0, 0), (1, 1), (2, 2)]
    # half the box of a kept, better detection of its class: IoU 0.5, NMS's threshold
    match_detections(ours([0.0, 0, 10, 5], 0.3), ref, rh, "made up")
    # equal scores swapped
    match_detections(ours([70.0, 70, 80, 80], 0.05, order=(0, 2, 1)), ref, rh, "made up")
    with pytest.raises(AssertionError, match="only in ours, and not a near-tie"):
        match_detections(ours([70.0, 70, 80, 80], 0.3), ref, rh, "made up")
    with pytest.raises(AssertionError, match="only in ours, and not a near-tie"):
        match_detections(ours([0.0, 0, 10, 6], 0.3), ref, rh, "made up")  # IoU 0.6
    with pytest.raises(AssertionError, match="another order"):
        match_detections(ours([70.0, 70, 80, 80], 0.05, order=(1, 0, 2)), ref, rh, "made up")
    # pixels and RoI labels: only near-ties may differ
    labels = torch.tensor([1, 0, 0])
    assert (
        assert_equal_except_near_ties(
            torch.tensor([0, 0, 0]), labels, torch.tensor([True, False, False]), "x"
        )
        == 1
    )
    with pytest.raises(AssertionError, match="1 of 3 differ away from any near-tie"):
        assert_equal_except_near_ties(
            torch.tensor([1, 1, 0]), labels, torch.tensor([True, False, False]), "x"
        )
    gt = torch.tensor([[0.0, 0, 10, 10]])
    rois = torch.tensor([[0.0, 0, 10, 5], [0, 0, 10, 6], [0, 0, 10, 4.999999]])
    assert roi_label_near_ties(rois, gt, 0.5).tolist() == [True, False, True]


def shift_box(boxes: torch.Tensor) -> None:
    boxes[0, 0] += 0.5


def flip_pixel(packed: dict) -> None:
    """The first pixel of the first pasted mask (a corner of the image, far from any object)."""
    packed["pred_masks_packed"][0] ^= 0x80


def scale_loss(losses: dict) -> None:
    losses["loss_box_reg"] *= 1.000001


def label_foreground(t: dict) -> None:
    """The first RoI (its IoU with every ground truth far from 0.5) labelled class 0."""
    t["roi_labels_before_sampling"][0] = 0


# what is changed in a copy of the fixture, and which check must then fail
PERTURBED = {
    "detection scores x 1.01": (lambda fx: fx["cases"][0]["instances"]["scores"].mul_(1.01),
                                "detections"),
    "a detection box moved by 0.5 px": (lambda fx: shift_box(fx["cases"][1]["instances"]
                                                             ["pred_boxes"]), "detections"),
    "mask probabilities x 1.01": (lambda fx: fx["cases"][0]["instances"]["pred_mask_probs"]
                                  .mul_(1.01), "detections"),
    "postprocessed scores x 1.01": (lambda fx: fx["cases"][1]["instances_postprocessed"]
                                    ["scores"].mul_(1.01), "postprocess"),
    "a pasted box moved by 0.5 px": (lambda fx: shift_box(fx["cases"][0]
                                     ["instances_postprocessed"]["pred_boxes"]), "postprocess"),
    "a pasted pixel flipped": (lambda fx: flip_pixel(fx["cases"][0]["instances_postprocessed"]),
                               "postprocess"),
    "a proposal moved by 0.5 px": (lambda fx: shift_box(fx["cases"][1]["proposals"]["boxes"]),
                                   "rpn"),
    "an anchor moved by 0.5 px": (lambda fx: shift_box(fx["anchors"][2]), "anchors"),
    "a training proposal moved by 0.5 px": (lambda fx: shift_box(fx["cases"][0]["train"]
                                            ["proposals"]["boxes"]), "training"),
    "a mask RoI moved by 0.5 px": (lambda fx: shift_box(fx["cases"][1]["train"]
                                   ["mask_fg_boxes"]), "training"),
    "a RoI labelled foreground": (lambda fx: label_foreground(fx["cases"][0]["train"]),
                                  "training"),
    "loss_box_reg x (1 + 1e-6)": (lambda fx: scale_loss(fx["train"]["losses"]), "training"),
}  # fmt: skip

CHECKS = {
    "detections": lambda fx, run, train: check_detections(fx, run),
    "postprocess": lambda fx, run, train: check_postprocess_and_coco_json(
        fx, run, check_detections(fx, run)
    ),
    "rpn": lambda fx, run, train: check_rpn_and_proposals(fx, run),
    "anchors": lambda fx, run, train: check_anchors(fx, run),
    "training": lambda fx, run, train: check_training(fx, train),
}


@pytest.mark.parametrize("name", sorted(PERTURBED))
def test_d2_perturbed_fixture_fails(d2, run, train, name):
    """The tolerances still catch a score off by 1 %, a box off by half a pixel, a pixel or a
    label decided otherwise away from any near-tie."""
    perturb, check = PERTURBED[name]
    fx = copy.deepcopy(d2)
    perturb(fx)
    with pytest.raises(AssertionError):
        CHECKS[check](fx, run, train)
    CHECKS[check](d2, run, train)  # the same check passes on the file as it is


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
