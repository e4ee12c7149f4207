"""cls/: loading every checkpoint format strictly, class checks, sharded evaluation, kNN and the
fast linear probe end to end on real CIFAR-10 images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, check_random_states
from test_data import cifar_folder
from test_models import TINY

from cls.data import class_folders
from cls.encoder import build_classifier
from cls.features import linear_probe_grid
from crossmae.checkpoint import save_atomic
from crossmae.distributed import shard
from crossmae.knn import knn_classify, topk_accuracy
from crossmae.models import create_model, to_official
from crossmae.models.pretrained import encoder_export, load_pretrained_encoder


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """The same tiny CrossMAE as an encoder export and as an official release."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    model = create_model("crossmae_vit_base_patch16", **TINY)
    save_atomic(encoder_export(model, model_name="crossmae_vit_base_patch16"), d / "encoder.pt")
    torch.save({"model": to_official(model.state_dict(), kind="crossmae")}, d / "official.pth")
    return model, d


def test_every_format_loads_the_same_encoder(tiny_checkpoints, tmp_path):
    """Our export and an official release of the same registered model load the same encoder
    (an official file says no widths: its official_arch must be the model it was trained as, a
    file of other widths is refused naming both)."""
    torch.manual_seed(0)
    model = create_model("crossmae_vit_tiny_patch16")
    save_atomic(encoder_export(model, model_name="crossmae_vit_tiny_patch16"), tmp_path / "e.pt")
    torch.save({"model": to_official(model.state_dict(), kind="crossmae")}, tmp_path / "o.pth")
    ours, cfg = load_pretrained_encoder(tmp_path / "e.pt")
    official, cfg2 = load_pretrained_encoder(tmp_path / "o.pth",
                                             official_arch="crossmae_vit_tiny_patch16")  # fmt: skip
    assert cfg == cfg2 and cfg["embed_dim"] == 192
    assert set(ours) == set(official) == set(model.encoder.state_dict())
    assert all(torch.equal(ours[k], official[k]) for k in ours)
    with pytest.raises(ValueError, match="official_arch"):
        load_pretrained_encoder(tmp_path / "o.pth")
    _, d = tiny_checkpoints  # the tiny widths of no registered model
    with pytest.raises(ValueError, match="not the encoder of official_arch=crossmae_vit_base"):
        load_pretrained_encoder(d / "official.pth", official_arch="crossmae_vit_base_patch16")


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_classifier_loads_strictly_and_resamples(tiny_checkpoints, pool):
    model, d = tiny_checkpoints
    sd, cfg = load_pretrained_encoder(d / "encoder.pt")
    clf = build_classifier(sd, cfg, num_classes=10, img_size=48, global_pool=pool)
    assert clf.pos_embed.shape[1] == 1 + 6 * 6 and clf(torch.randn(2, 3, 48, 48)).shape == (2, 10)
    assert torch.equal(clf.blocks[1].mlp.fc1.weight, model.encoder.blocks[1].mlp.fc1.weight)
    wide = build_classifier(sd, cfg, num_classes=10, img_size=(32, 64), global_pool=pool)
    assert wide(torch.randn(1, 3, 32, 64)).shape == (1, 10) and wide.grid_size == (4, 8)
    with pytest.raises(KeyError, match="unexpected keys"):
        build_classifier({**sd, "decoder.x": torch.zeros(1)}, cfg, num_classes=10)
    del sd["blocks.0.attn.qkv.weight"]
    with pytest.raises(KeyError, match=r"missing keys \['blocks.0.attn.qkv.weight'\]"):
        build_classifier(sd, cfg, num_classes=10)


def test_train_and_val_classes_must_agree(shared_dir, tmp_path):
    cifar_folder(shared_dir, tmp_path / "train", per_class=1, classes=3)
    cifar_folder(shared_dir, tmp_path / "val", per_class=1, classes=2)
    with pytest.raises(ValueError, match=r"only in train \['bird'\]"):
        class_folders(tmp_path / "train", tmp_path / "val")


def test_the_first_images_of_each_class(shared_dir, tmp_path):
    cifar_folder(shared_dir, tmp_path / "train", per_class=4, classes=3)
    cifar_folder(shared_dir, tmp_path / "val", per_class=3, classes=3)
    tr, va = class_folders(tmp_path / "train", tmp_path / "val", per_class=2)
    assert tr.labels == va.labels == [0, 0, 1, 1, 2, 2]
    full = class_folders(tmp_path / "train", tmp_path / "val")[0]
    pairs = list(zip(full.files, full.labels, strict=True))
    assert tr.files == [f for c in range(3) for f in [f for f, y in pairs if y == c][:2]]


def test_shards_cover_every_image_once():
    for n, world in [(10, 3), (7, 2), (2, 4)]:
        parts = [shard(n, r, world) for r in range(world)]
        assert sorted(i for p in parts for i in p) == list(range(n))


def test_knn_and_probe_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=g)
    scores = knn_classify(x[:240], y[:240], x[240:], num_classes=3, k=5)
    assert topk_accuracy(scores, y[240:])["top1"] == 100.0
    # LARS moves weights by ~trust x |w| per step: small data needs a large base lr
    res = linear_probe_grid({"x": (x[:240], x[240:])}, y[:240], y[240:], num_classes=3,
                            blrs=[1.0, 10.0], epochs=60, warmup_epochs=2,
                            batch_size=60)  # fmt: skip
    assert res["best"]["top1"] == 100.0 and res["best"]["blr"] == 10.0
    assert res["grid"][0]["blr"] == 1.0 and res["grid"][0]["top1"] < 100.0


@pytest.mark.slow
def test_the_probe_grid_covers_every_setting_and_its_best_is_the_single_run(shared_dir, tmp_path):
    """dinov2's grid (base lr x last-n blocks x pooling) on cached features: one entry per
    combination, and its best is what ``cls frozen`` gives when run with that combination
    alone (every head starts from the same seed and sees the same batches). kNN for each k."""
    from conftest import tiny_encoder_export

    from cls.task import FrozenTask
    from crossmae.config import load_config
    from crossmae.runner import run_task

    tiny_encoder_export(tmp_path / "enc.pt", embed_dim=32, depth=4, num_heads=2)
    train = cifar_folder(shared_dir, tmp_path / "train", per_class=10, classes=3)
    val = cifar_folder(shared_dir, tmp_path / "val", per_class=6, classes=3)
    common = [f"encoder.checkpoint={tmp_path / 'enc.pt'}", f"data.train={train}",
              f"data.val={val}", "data.img_size=32", "data.num_workers=0", "probe.epochs=4",
              "probe.warmup_epochs=1", "probe.batch_size=10", "probe.blrs=[0.3,3.0]",
              "knn.ks=[1,5,20]", "knn.k=5"]  # fmt: skip

    def frozen(*settings: str) -> dict:
        cfg = load_config(FrozenTask.schema, [], [*common, *settings], complete=True)
        return run_task(FrozenTask(cfg), cfg)["metrics"]

    m = frozen("probe.n_blocks=[1,4]", "probe.pools=[cls,avg,cls+avg]")
    grid = m["linprobe_grid"]
    assert len(grid) == 2 * 2 * 3
    assert {(g["input"], g["blr"]) for g in grid} == {
        (f"last{n}_{q}", b) for n in (1, 4) for q in ("cls", "avg", "cls+avg") for b in (0.3, 3.0)
    }
    assert m["linprobe_top1"] == max(g["top1"] for g in grid)
    assert set(m["knn_by_k"]) == {"1", "5", "20"} and m["knn_top1"] == m["knn_by_k"]["5"]["top1"]
    best = m["linprobe_best"]
    n, pool = best["input"].removeprefix("last").split("_")
    alone = frozen(f"probe.n_blocks=[{n}]", f"probe.pools=[{pool}]", f"probe.blrs=[{best['blr']}]")
    assert len(alone["linprobe_grid"]) == 1
    assert alone["linprobe_top1"] == m["linprobe_top1"]
    assert alone["per_class"]["linprobe"] == m["per_class"]["linprobe"]
    # a grid asking for more blocks than the encoder has uses all it has
    assert {
        g["input"] for g in frozen("probe.n_blocks=[9]", "probe.pools=[cls]")["linprobe_grid"]
    } == {"last4_cls"}
    # control=true: the same architecture untrained, evaluated the same way, and the gain
    one = ("probe.n_blocks=[4]", "probe.pools=[cls]", "probe.blrs=[0.3]")
    pretrained, untrained = frozen(*one, "control=true"), frozen(*one, "encoder.random_init=true")
    assert pretrained["linprobe_top1"] == frozen(*one)["linprobe_top1"]
    for key in ("knn_top1", "linprobe_top1"):
        assert pretrained["control"][key] == untrained[key]
        assert pretrained["gain"][key] == pytest.approx(pretrained[key] - untrained[key])


@pytest.mark.slow
def test_frozen_eval_end_to_end_and_on_two_processes(shared_dir, tiny_checkpoints, tmp_path):
    _, d = tiny_checkpoints
    train = cifar_folder(shared_dir, tmp_path / "train", per_class=8, classes=3)
    val = cifar_folder(shared_dir, tmp_path / "val", per_class=5, classes=3)
    common = [
        f"encoder.checkpoint={d / 'encoder.pt'}", f"data.train={train}", f"data.val={val}",
        "data.img_size=32",
        "data.num_workers=0", "probe.epochs=3", "probe.warmup_epochs=1", "probe.batch_size=8",
    ]  # fmt: skip
    from crossmae.cli import main

    assert main(["cls", "frozen", *common, f"output_dir={tmp_path / 'one'}"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "cls", "frozen", *common, f"output_dir={tmp_path / 'two'}"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = (json.loads((tmp_path / f / "results.json").read_text())["metrics"]
            for f in ("one", "two"))  # fmt: skip
    assert a["val_images"] == b["val_images"] == 15 and a["train_images"] == 24
    # every validation image counted once: the same accuracies on 1 and 2 processes
    assert a["knn_top1"] == pytest.approx(b["knn_top1"])
    assert a["linprobe_top1"] == pytest.approx(b["linprobe_top1"])
    assert main(["cls", "frozen", *common, "model.pool=max"]) == 2


def finetune_cfg(shared_dir, tmp_path, ckpt_dir, *extra, schema=None):
    from cls.config import FinetuneConfig
    from crossmae.config import load_config

    train = tmp_path / "train"
    if not train.exists():
        cifar_folder(shared_dir, train, per_class=8, classes=3)
        cifar_folder(shared_dir, tmp_path / "val", per_class=5, classes=3)
    overrides = [
        f"encoder.checkpoint={ckpt_dir / 'encoder.pt'}",
        f"data.train={train}",
        f"data.val={tmp_path / 'val'}",
        *[
            "data.img_size=32",
            "train.batch_size=8",
            "train.epochs=2",
            "optim.warmup_epochs=1",
            "data.num_workers=0",
        ],
        *["train.precision=fp32", "train.device=cpu", "log.every_steps=1"],
        *extra,
    ]
    return load_config(schema or FinetuneConfig, [], overrides)


def finetune(cfg, resume: str | None = None) -> dict:
    """``crossmae cls finetune`` / ``linprobe`` (by the config's schema) through the runner."""
    from omegaconf import OmegaConf

    from crossmae.runner import run_task
    from crossmae.task import get_task

    name = "linprobe" if OmegaConf.get_type(cfg).__name__ == "LinprobeConfig" else "finetune"
    return run_task(get_task(name)(cfg), cfg, resume)


def lrs(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


@pytest.mark.slow
def test_finetune_end_to_end_and_resume_continues_the_schedule(
    shared_dir, tiny_checkpoints, tmp_path, monkeypatch
):
    import signal

    from crossmae import optim

    _, d = tiny_checkpoints
    full = finetune(
        finetune_cfg(
            shared_dir, tmp_path, d, f"output_dir={tmp_path / 'a'}", "model.ema_decay=0.99"
        )
    )
    assert full["step"] == 6 and not full["interrupted"]
    assert full["last"]["images"] == 15 and 0 <= full["last"]["top1"] <= 100
    for f in ("checkpoint-last.pt", "checkpoint-best.pt", "results.json"):
        assert (tmp_path / "a" / f).is_file()

    # interrupt during step 2 (of 6), then resume: the lr of every step is the uninterrupted one
    orig = optim.SCHEDULES["cosine"]

    def lr_at_and_stop(step, **kw):
        if step == 2:
            signal.raise_signal(signal.SIGTERM)
        return orig(step, **kw)

    monkeypatch.setitem(optim.SCHEDULES, "cosine", lr_at_and_stop)
    cfg = finetune_cfg(
        shared_dir, tmp_path, d, f"output_dir={tmp_path / 'b'}", "model.ema_decay=0.99"
    )
    stopped = finetune(cfg)
    assert stopped["interrupted"] and stopped["step"] == 3
    monkeypatch.setitem(optim.SCHEDULES, "cosine", orig)
    check_random_states(tmp_path / "b" / "checkpoint-last.pt")
    resumed = finetune(cfg, resume="auto")
    assert resumed["step"] == 6 and not resumed["interrupted"]
    assert lrs(tmp_path / "b") == pytest.approx(lrs(tmp_path / "a"))
    # a record every 3 steps holds the mean loss of those 3 steps
    finetune(finetune_cfg(shared_dir, tmp_path, d, f"output_dir={tmp_path / 'c'}",
                             "model.ema_decay=0.99", "log.every_steps=3"))  # fmt: skip

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    every, third = losses("a"), losses("c")
    assert sorted(third) == [3, 6]
    assert third[3] == pytest.approx(sum(every[s] for s in (1, 2, 3)) / 3, rel=1e-5)
    assert third[6] == pytest.approx(sum(every[s] for s in (4, 5, 6)) / 3, rel=1e-5)


CLS_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "cls").glob("*.yaml"))


@pytest.mark.parametrize("path", CLS_CONFIGS, ids=lambda p: p.stem)
def test_cls_configs_load(path):
    from cls.config import FinetuneConfig, FrozenEvalConfig, LinprobeConfig
    from crossmae.config import load_config

    text = path.read_text()
    assert "# Command:" in text and "# Hardware:" in text
    schemas = {"finetune": FinetuneConfig, "linprobe": LinprobeConfig, "frozen": FrozenEvalConfig,
               "overfit": FinetuneConfig}  # fmt: skip
    schema = schemas[path.stem.split("_")[0]]
    untrained = "\n  arch:" in text  # an untrained encoder of a registered model, no checkpoint
    required = [*([] if untrained else ["encoder.checkpoint=x.pt"]), "data.train=t", "data.val=v"]
    if schema is not FrozenEvalConfig:
        required.append("output_dir=o")
    cfg = load_config(schema, [path], required)
    assert cfg.data.img_size in (32, 224)


def test_linear_probe_trains_only_the_head(shared_dir, tiny_checkpoints, tmp_path):
    from cls.config import LinprobeConfig

    _, d = tiny_checkpoints
    cfg = finetune_cfg(shared_dir, tmp_path, d, f"output_dir={tmp_path / 'p'}", "optim.blr=1.0",
                       schema=LinprobeConfig)  # fmt: skip
    result = finetune(cfg)
    assert result["step"] == 6 and result["last"]["images"] == 15
    ck = torch.load(tmp_path / "p" / "checkpoint-last.pt", weights_only=True)
    enc, _ = load_pretrained_encoder(d / "encoder.pt")
    assert torch.equal(ck["model"]["blocks.0.attn.qkv.weight"], enc["blocks.0.attn.qkv.weight"])
    assert "head.0.running_mean" in ck["model"] and "head.1.weight" in ck["model"]


@pytest.mark.slow
def test_finetune_evaluation_on_two_processes_counts_each_image_once(
    shared_dir, tiny_checkpoints, tmp_path
):
    _, d = tiny_checkpoints
    train = cifar_folder(shared_dir, tmp_path / "train", per_class=2, classes=3)
    val = cifar_folder(shared_dir, tmp_path / "val", per_class=5, classes=3)  # 15: odd on purpose
    worker = [str(Path(__file__).parent / "dist_eval_worker.py"), str(d / "encoder.pt"), str(train),
              str(val)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    one = subprocess.run([sys.executable, *worker, str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=300, env=env)  # fmt: skip
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *worker, str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a = json.loads((tmp_path / "one-0.json").read_text())
    for rank in (0, 1):
        b = json.loads((tmp_path / f"two-{rank}.json").read_text())
        assert b["images"] == a["images"] == 15
        assert b["top1"] == pytest.approx(a["top1"]) and b["top5"] == pytest.approx(a["top5"])


def test_randaugment_posterize_at_full_magnitude_does_not_crash():
    """timm's increasing posterize keeps 0 bits at magnitude 10, which Pillow 13 rejects: the
    finetuning pipeline's own posterize ops give a black image there (timm itself untouched)."""
    import timm.data.auto_augment as aa
    from PIL import Image

    from cls.config import FinetuneConfig
    from cls.finetune import training_transform
    from crossmae.config import load_config

    cfg = load_config(FinetuneConfig, [], ["data.img_size=8"])
    ops = [op for t in training_transform(cfg).transforms for op in getattr(t, "ops", ())
           if op.name == "PosterizeIncreasing"]  # fmt: skip
    assert ops, "no posterize in the RandAugment pipeline"
    op = ops[0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op(img).getpixel((0, 0)) == (0, 0, 0)
    op.magnitude = 5
    assert op(img).getpixel((0, 0)) == (192, 64, 0)  # 2 bits kept
    assert aa.NAME_TO_OP["PosterizeIncreasing"] is aa.posterize  # timm's table as it was


RECIPE_CONFIGS = sorted((REPO / "configs" / "cls").glob("*_vit_*.yaml"))


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: p.stem)
def test_cls_config_follows_the_recipe_table(path):
    """Each shipped ImageNet config sets exactly the values of ``cls/recipes.py`` for its size,
    and its header names each value's source and the expected result."""
    from omegaconf import OmegaConf

    from cls.config import FinetuneConfig, FrozenEvalConfig, LinprobeConfig
    from cls.recipes import FINETUNE, FROZEN_KEYS, LINPROBE
    from crossmae.config import load_config

    kind, size = path.stem.split("_vit_")
    schema, table = {"finetune": (FinetuneConfig, FINETUNE), "linprobe": (LinprobeConfig, LINPROBE),
                     "frozen": (FrozenEvalConfig, LINPROBE)}[kind]  # fmt: skip
    recipe = table[size]
    cfg = load_config(schema, [path])
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    keys = FROZEN_KEYS if kind == "frozen" else {k: k for k in recipe if k != "expected"}
    for key, recipe_key in keys.items():
        value, source = recipe[recipe_key]
        got = OmegaConf.select(cfg, key)
        assert got == value, f"{path.name}: {key} = {got}, the recipe says {value}"
        assert f"{key}: " in header and source in header, f"{path.name}: {key} without its source"
    expected, source = recipe["expected"]
    assert f"Expected: top-1 {expected if expected is not None else 'not reported'}" in header
    assert source in header


def test_mae_evaluation_crop_and_linear_probe_crop():
    """MAE's evaluation view (crop 224/256 up to 224 px, none above) and its linear-probe crop
    (one draw, clamped to the image)."""
    from PIL import Image

    from crossmae.data.transforms import SingleDrawRandomResizedCrop, classify_eval_transform

    assert classify_eval_transform(224).transforms[0].size == 256
    assert classify_eval_transform(448).transforms[0].size == 448  # crop_pct 1.0
    assert classify_eval_transform(384, crop_pct=0.875).transforms[0].size == 438
    torch.manual_seed(0)
    wide = Image.new("RGB", (300, 100))
    crop = SingleDrawRandomResizedCrop.get_params
    boxes = [crop(wide, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(200)]
    assert all(t >= 0 and left >= 0 and t + h <= 100 and left + w <= 300 for t, left, h, w in boxes)
    # a wide image and a large area: torchvision retries or falls back to the centre; MAE's clamps
    assert any(h == 100 for _, _, h, _ in boxes)
