"""seg/ against mmsegmentation itself: ``mmseg_upernet_tiny.pt`` holds what mmseg 1.2.2's MAE
UperNet (float64, CPU, eval) computed at every stage on an ADE20K image, with its own state dict.
We import that state dict with ``seg.export.import_mmseg``, build the model from the file's
``config`` and reproduce every stage. ``$CROSSMAE_MMSEG_FIXTURE`` names another file of the same
format.

The file was written on another CPU (see ``spread.py``). mmseg computes every stored value in
float64 (the slide logits are stored as float32 copies), so CPUs differ only by float64 rounding,
~1e-15 relative; mmseg itself run in float32 differs from the file by 7.5e-7 relative, so REL
below still catches a float32 step. Uint8 resizing (OpenCV's fixed-point bilinear, nearest for
labels) is integer arithmetic: exact. An argmax is compared exactly but for pixels whose two best
logits are within the logits' spread of each other, and metrics are counted from the labels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import parity_fixture
from omegaconf import DictConfig
from spread import assert_equal_except_near_ties

from crossmae.checkpoint import load_state_dict_strict, save_atomic
from crossmae.config import load_config
from crossmae.models.pretrained import encoder_export
from crossmae.optim import make_schedule, optimizer_groups
from seg.config import SegConfig
from seg.data import IGNORE, rescale_size, resize_u8
from seg.evaluate import segment, slide_inference, slide_windows
from seg.export import backbone_to_mmseg, import_mmseg, mmseg_architecture
from seg.metrics import SegMetrics
from seg.model import SegViT, UperNet, segmentation_losses

FIXTURE_ENV = "CROSSMAE_MMSEG_FIXTURE"
REL = 1e-10  # float64 features and logits, relative to the largest
SLIDE_REL = 1e-6  # float64 logits stored as float32: 6e-8 relative, with a margin


@pytest.fixture(scope="module")
def mm(request) -> dict:
    fx = torch.load(
        parity_fixture(request, FIXTURE_ENV, "mmseg_upernet_tiny.pt"), weights_only=True
    )
    assert fx["format"] == "mmseg-mae-upernet-parity-v1"
    return fx


def config_of(mm: dict) -> DictConfig:
    """Our SegConfig for the fixture's mmseg config."""
    c = mm["config"]
    assert c["rescales"] == [4, 2, 1, 0.5] and c["init_values"] == 1.0
    return load_config(SegConfig, [], [
        f"data.crop={c['crop']}", f"eval.stride={c['stride']}", f"model.channels={c['channels']}",
        f"model.aux_channels={c['aux_channels']}", f"model.pool_scales={list(c['pool_scales'])}",
        f"model.out_indices={list(c['out_indices'])}", f"optim.layer_decay={c['layer_decay']}",
        f"optim.weight_decay={c['weight_decay']}", f"optim.lr={c['base_lr']}",
        f"model.drop_path_rate={c['drop_path_rate']}",
    ])  # fmt: skip


def model_from_config(mm: dict) -> UperNet:
    c = mm["config"]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        backbone = SegViT(img_size=c["img"], patch_size=c["patch"], embed_dim=c["embed"],
                          depth=c["depth"], num_heads=c["heads"], mlp_ratio=c["mlp_ratio"],
                          norm_eps=c["ln_eps"], drop_path_rate=c["drop_path_rate"],
                          out_indices=c["out_indices"])  # fmt: skip
        return UperNet(backbone, c["num_classes"], channels=c["channels"],
                       aux_channels=c["aux_channels"], pool_scales=c["pool_scales"])  # fmt: skip
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def model(mm, tmp_path_factory) -> UperNet:
    """mmseg's state dict, saved as mmengine saves a checkpoint and read back through
    ``python -m seg import-mmseg``'s importer, in the model built from ``config``."""
    path = tmp_path_factory.mktemp("mmseg") / "iter_160000.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": mm["state_dict"]}, path)
    ck = import_mmseg(path, {"model": {"out_indices": list(mm["config"]["out_indices"])}})
    m = model_from_config(mm)
    load_state_dict_strict(m, ck["model"], what="imported mmseg model")
    return m.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def check_prediction(logits: torch.Tensor, ref: torch.Tensor, what: str) -> torch.Tensor:
    """The argmax of (1, C, H, W) ``logits`` against the reference's (H, W) uint8 prediction,
    exact but for near-ties (two best logits within 2 * REL of the largest logit). Returns the
    prediction to count metrics from: ours, with a near-tie another CPU broke the other way
    counted as the reference's, so that the metrics still compare exactly."""
    pred = logits.argmax(1)[0]
    top = logits[0].topk(2, dim=0).values
    ties = (top[0] - top[1]) <= 2 * REL * logits.abs().max()
    assert_equal_except_near_ties(pred.to(torch.uint8), ref, ties, what)
    return torch.where(ties, ref.long(), pred)


def test_mmseg_importer_reads_the_architecture(mm):
    c = mm["config"]
    arch = mmseg_architecture(mm["state_dict"])
    enc = arch["encoder"]
    assert (enc["embed_dim"], enc["depth"], enc["num_heads"], enc["patch_size"]) == (
        c["embed"], c["depth"], c["heads"], c["patch"])  # fmt: skip
    assert enc["mlp_ratio"] == c["mlp_ratio"] and arch["crop"] == c["img"]
    assert (arch["channels"], arch["aux_channels"], arch["num_classes"]) == (
        c["channels"], c["aux_channels"], c["num_classes"])  # fmt: skip
    assert arch["num_pool_scales"] == len(c["pool_scales"])


def test_mmseg_features_and_logits(mm, model):
    crop = mm["config"]["crop"]
    x = mm["input"][..., :crop, :crop]
    exp = mm["expected"]
    with torch.no_grad():
        feats = model.backbone(x)
        pyramid = model.neck(feats)
        out = model(x)
    for ours, ref in zip(feats, exp["backbone"], strict=True):
        assert rel(ours, ref) < REL
    for ours, ref in zip(pyramid, exp["pyramid"], strict=True):
        assert rel(ours, ref) < REL
    assert rel(out["logits"], exp["decode_logits"]) < REL
    assert rel(out["aux_logits"], exp["aux_logits"]) < REL


def each_image(mm):
    yield mm["input"], mm["label"], mm["expected"]["slide_logits"], mm["expected"]
    for im in mm["more_images"]:
        yield im["input"], im["label"], im["slide_logits"], im


def test_mmseg_slide_inference_and_metrics(mm, model):
    c = mm["config"]
    total = SegMetrics(c["num_classes"], IGNORE)
    for x, label, ref_logits, exp in each_image(mm):
        H, W = x.shape[-2:]
        windows = slide_windows(H, W, c["crop"], c["stride"])
        assert [list(w) for w in windows] == [list(w) for w in exp["slide_windows"]]
        logits = slide_inference(model, x, c["num_classes"], crop=c["crop"], stride=c["stride"])
        assert rel(logits, ref_logits) < SLIDE_REL
        pred = check_prediction(logits, exp["slide_pred"], "slide prediction")
        one = SegMetrics(c["num_classes"], IGNORE)
        one.update(pred, label.long())
        total.update(pred, label.long())
        if "metrics" in exp:
            check_metrics(one.compute(), exp["metrics"])
    check_metrics(total.compute(), mm["expected"]["metrics_all"])


def check_metrics(ours: dict, ref: dict) -> None:
    """IoUMetric's unrounded percentages and per-class fractions (NaN where a class is absent):
    ratios of pixel counts, so equal to float64 rounding."""
    for key in ("aAcc", "mIoU", "mAcc"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key
    for key, theirs in (("IoU", "IoU_per_class"), ("Acc", "Acc_per_class")):
        if theirs not in ref:
            continue
        a, b = np.array(ours[key]) / 100, np.array(ref[theirs], dtype=float)
        assert np.array_equal(np.isnan(a), np.isnan(b)), key
        assert np.allclose(a[~np.isnan(a)], b[~np.isnan(b)], atol=1e-12), key


def test_mmseg_losses(mm, model):
    """Both heads' cross entropy divided by all pixels (ignored ones included), weights 1.0 and
    0.4, and mmseg's accuracy, on the first window's eval-mode logits."""
    crop = mm["config"]["crop"]
    with torch.no_grad():
        out = model(mm["input"][..., :crop, :crop])
    label = mm["label"][None, :crop, :crop].long()
    assert (label == IGNORE).any()  # the normalisation matters on this window
    ours = segmentation_losses(out, label, aux_weight=0.4)
    # float64 means of cross entropies agree to ~REL; 1e-6 relative admits acc_seg, which the
    # file holds as a float32 value
    for name, ref in mm["expected"]["loss"].items():
        assert float(ours[name]) == pytest.approx(ref, rel=1e-6, abs=1e-9), name
    # mmseg's avg_non_ignore=True would divide by the labelled pixels instead
    other = segmentation_losses(out, label, aux_weight=0.4, avg_non_ignore=True)
    assert float(other["decode_loss_ce"]) > float(ours["decode_loss_ce"])


def test_mmseg_parameter_groups_and_lr(mm, model):
    cfg = config_of(mm)
    groups = optimizer_groups(model, cfg.optim)
    ours = {}
    for g in groups:
        for n in g["names"]:
            head, _, rest = n.partition(".")
            name = f"backbone.{backbone_to_mmseg(rest)}" if head == "backbone" else n
            ours[name] = (g["lr_scale"], g["weight_decay"])
    ref = mm["expected"]["param_groups"]
    assert ours.keys() == ref.keys()
    for name, (scale, wd) in ref.items():
        assert ours[name][0] == pytest.approx(scale, rel=1e-12), name
        assert ours[name][1] == wd, name
    # our default schedule is mmseg 1.x's LinearLR + PolyLR, value at each stored iteration
    default = load_config(SegConfig, [], [])
    schedule = make_schedule(default.optim, mm["config"]["base_lr"], default.train.steps, 1)
    for it, lr in mm["expected"]["lr"].items():
        assert schedule(it) == pytest.approx(lr, abs=1e-10 * mm["config"]["base_lr"]), it


def test_mmseg_test_pipeline(mm, model):
    """mmseg's Resize(scale, keep_ratio) on uint8 with OpenCV, and the whole test path."""
    p = mm["pipeline"]
    img = mm["image_u8"]
    H, W = img.shape[-2:]
    size = rescale_size(H, W, tuple(p["scale"]))
    assert list(size) == list(p["img_shape"])
    resized = resize_u8(np.ascontiguousarray(img.permute(1, 2, 0).numpy()), size)
    assert np.array_equal(resized, p["resized_bgr_hwc"].numpy()[..., ::-1])  # BGR there
    label = resize_u8(mm["label"].numpy(), size, nearest=True)
    assert np.array_equal(label, p["resized_gt_seg_map"].numpy())
    c = mm["config"]
    scores = segment(model, img, c["num_classes"], crop=c["crop"], stride=c["stride"],
                     scale=tuple(p["scale"]))  # fmt: skip
    test = p["test_path"]
    assert [list(w) for w in slide_windows(*size, c["crop"], c["stride"])] == [
        list(w) for w in test["slide_windows"]
    ]
    pred = check_prediction(scores, test["pred"], "test-path prediction")
    metrics = SegMetrics(c["num_classes"], IGNORE)
    metrics.update(pred, mm["label"].long())
    check_metrics(metrics.compute(), test["metrics"])


def test_mmseg_export_has_the_backbone_keys_mmseg_loads(mm, tmp_path):
    """The pretrained file: exactly the fixture backbone's keys without the ``backbone.`` prefix
    and at their shapes, less only the relative-position tables and layer scales (which an MAE
    encoder does not have)."""
    from crossmae.cli import main as cli
    from crossmae.models import create_model

    def main(argv):
        return cli(["seg", *argv])

    c = mm["config"]
    torch.manual_seed(0)
    enc = create_model("mae_vit_base_patch16", img_size=c["img"], patch_size=c["patch"],
                       embed_dim=c["embed"], depth=c["depth"], num_heads=c["heads"],
                       decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    save_atomic(encoder_export(enc, model_name="mae_vit_base_patch16"), tmp_path / "enc.pt")
    assert cli(["convert", "to-mmseg", str(tmp_path / "enc.pt"), str(tmp_path / "mm.pth")]) == 0
    out = torch.load(tmp_path / "mm.pth", weights_only=True)
    backbone = {k.removeprefix("backbone."): v.shape for k, v in mm["state_dict"].items()
                if k.startswith("backbone.")}  # fmt: skip
    assert {k: v.shape for k, v in out.items()} == {k: s for k, s in backbone.items() if k in out}
    left = set(backbone) - set(out)
    assert left and all(k.endswith(("relative_position_bias_table", "relative_position_index",
                                    "gamma_1", "gamma_2")) for k in left)  # fmt: skip
    assert torch.equal(out["layers.1.ffn.layers.1.weight"], enc.encoder.blocks[1].mlp.fc2.weight)


def test_mmseg_import_then_evaluate_commands(mm, shared_dir, tmp_path, capsys):
    """``python -m seg import-mmseg`` then ``python -m seg evaluate``: an mmseg checkpoint scored on
    the ADE20K samples (classes beyond the model's count ignored, as in the fixture's label)."""
    import json

    from crossmae.cli import main as cli

    def main(argv):

        return cli(["seg", *argv])

    c = mm["config"]
    torch.save({"meta": {}, "state_dict": mm["state_dict"]}, tmp_path / "mmseg.pth")
    assert main(["import-mmseg", str(tmp_path / "mmseg.pth"), str(tmp_path / "ours.pt"),
                 f"model.out_indices={list(c['out_indices'])}"]) == 0  # fmt: skip
    capsys.readouterr()
    root = shared_dir / "data" / "ade20k_samples"
    args = [f"data.root={root}", "data.dataset=custom", f"data.num_classes={c['num_classes']}",
            "data.reduce_zero_label=true", "data.ignore_other_labels=true",
            "data.val_split=validation",
            f"eval.stride={c['stride']}", f"data.scale={list(mm['pipeline']['scale'])}",
            "train.device=cpu"]  # fmt: skip
    assert main(["evaluate", str(tmp_path / "ours.pt"), *args]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) == {"mIoU", "mAcc", "aAcc"} and 0 <= metrics["mIoU"] <= 100
    # a checkpoint of another kind is refused in one line
    save_atomic({"format": "crossmae-det-v2"}, tmp_path / "det.pt")
    assert main(["evaluate", str(tmp_path / "det.pt"), f"data.root={root}"]) == 2
    assert "is a 'crossmae-det-v2' checkpoint (a ViTDet Mask R-CNN" in capsys.readouterr().err
