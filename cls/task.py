"""The classification tasks on a pretrained encoder, run by ``crossmae.runner``:

- ``cls finetune`` (``FinetuneTask``): the MAE / CrossMAE recipe: AdamW, layer-wise lr decay,
  warmup + cosine, drop path, RandAugment, mixup / cutmix, random erasing, label smoothing,
  average pooling + fc_norm, optional EMA;
- ``cls linprobe`` (``LinprobeTask``): the paper's linear probe: frozen encoder, cls token,
  BatchNorm + Linear head, LARS, RandomResizedCrop + flip;
- ``cls frozen`` (``FrozenTask``): kNN and the fast linear probe on cached features (an
  evaluation: no training steps).

Accuracy on the val split every epoch (exact distributed counting), best and last checkpoints:

    torchrun --nproc-per-node 8 -m crossmae cls finetune \\
        --config configs/cls/finetune_vit_base.yaml output_dir=... data.train=... data.val=... \\
        encoder.checkpoint=runs/crossmae_b_800/checkpoint-last.pt
"""

from __future__ import annotations

import copy
import hashlib
import logging
from functools import partial
from pathlib import Path

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from crossmae.bench import BenchCase, bench_encoder, register_bench_case
from crossmae.checkpoint import register_format
from crossmae.config import ConfigError
from crossmae.data import Indexed, Labelled
from crossmae.engine import Engine, Hook
from crossmae.evaluation import Evaluation
from crossmae.knn import extract_block_features, knn_classify_ks, pooled, topk_accuracy
from crossmae.models import VisionTransformer
from crossmae.models.pretrained import encoder_of
from crossmae.task import EncoderScore, Task, TransferStage, register_group, register_task

from .config import FinetuneConfig, FrozenEvalConfig, LinprobeConfig
from .data import class_folders
from .encoder import build_classifier
from .features import ProbeHead, cached_features, linear_probe_grid
from .finetune import evaluate_classifier, format_classes, per_class_of, training_transform

log = logging.getLogger("crossmae")
PLAN_CLASSES = 1000  # what the memory planner assumes: ImageNet, as the GPU recipes train
FINETUNE_FORMAT = register_format(
    "crossmae-finetune-v1", "a classifier finetuned or linear-probed by cls finetune / linprobe"
)
IMAGENET = {"IMAGENET": ("data.train={root}/train", "data.val={root}/val")}
register_group(("cls",), "classification transfer: kNN + fast probe, the linear probe, finetuning")


class EmaUpdate(Hook):
    """Update a timm ``ModelEmaV3`` after every optimizer step that was taken."""

    name = "ema"

    def __init__(self, ema, model: nn.Module):
        self.ema, self.model = ema, model

    def after_update(self, engine: Engine) -> None:
        self.ema.update(self.model, step=engine.step)


def classifier_headline(key: str, result: dict) -> dict:
    """The last and the best evaluation's top-1 of a finetune / linprobe run as ``key`` and
    ``key_best``."""
    return {key: result["last"]["top1"], f"{key}_best": result["best"]["top1"]}


def classifier_smoke(name: str, shared: Path, scratch: Path) -> tuple[str, list[str]]:
    """3 CIFAR-10 classes, 8 training and 4 val images each, 32 px, one epoch (``name``:
    finetune or linprobe)."""
    root = cifar_subset(shared, scratch / "cls")
    return (f"configs/cls/{name}_cifar10_tiny.yaml",
            [f"data.train={root / 'train'}", f"data.val={root / 'val'}", "data.img_size=32",
             "train.epochs=1", "optim.warmup_epochs=0", "train.batch_size=8"])  # fmt: skip


def frozen_headline(result: dict) -> dict:
    m = result["metrics"]
    return {"knn_top1": m["knn_top1"], "fast_probe_top1": m["linprobe_top1"]}


def frozen_ablation_settings(encoder: Path, train: str, val: str, img_size: int,
                             workers: int) -> list[str]:  # fmt: skip
    """``crossmae ablate``'s scoring of one encoder: the probe of
    configs/cls/frozen_imagenette_small.yaml on one feature, the last block's patch mean, for kNN
    (k = 20) and the probe alike."""
    return [f"encoder.checkpoint={encoder}", f"data.train={train}", f"data.val={val}",
            f"data.img_size={img_size}", f"data.num_workers={workers}", "model.pool=avg",
            "probe.epochs=50", "probe.warmup_epochs=5", "probe.batch_size=1024",
            "probe.blrs=[0.1,0.3,1.0,3.0,10.0]", "probe.n_blocks=[1]", "probe.pools=[avg]",
            "knn.ks=[20]"]  # fmt: skip


def frozen_scores(metrics: dict) -> dict[str, float]:
    return {"knn_top1": metrics["knn_top1"], "probe_top1": metrics["linprobe_top1"]}


def frozen_smoke(shared: Path, scratch: Path) -> tuple[str, list[str]]:
    """3 CIFAR-10 classes, 8 training and 4 val images each, 32 px, a short probe."""
    root = cifar_subset(shared, scratch / "cls")
    return ("configs/cls/frozen_cifar10_tiny.yaml",
            [f"data.train={root / 'train'}", f"data.val={root / 'val'}", "data.img_size=32",
             f"data.cache_dir={scratch / 'features'}", "probe.epochs=2",
             "probe.warmup_epochs=0", "knn.k=5", "knn.ks=[5]"])  # fmt: skip


@register_task
class FinetuneTask(Task):
    """End-to-end finetuning of a pretrained encoder on an ImageFolder (module docstring)."""

    name = "finetune"
    command = ("cls", "finetune")
    help = "end-to-end finetuning (MAE / CrossMAE recipe)"
    schema = FinetuneConfig
    format = FINETUNE_FORMAT
    transfer = TransferStage("finetune", 2, "configs/cls/finetune_vit_{size}.yaml", IMAGENET,
                             (("finetune top-1", ("finetune_top1",)),),
                             cpu_config="configs/cls/finetune_cifar10_tiny.yaml",
                             headline=partial(classifier_headline, "finetune_top1"),
                             smoke=partial(classifier_smoke, "finetune"))  # fmt: skip

    def __init__(self, cfg):
        super().__init__(cfg)
        d = cfg.data
        self.mixup = None
        if d.mixup > 0 or d.cutmix > 0:
            self.criterion = SoftTargetCrossEntropy()
        elif d.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(d.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.ema = None

    def open_data(self) -> None:
        m, d = self.cfg.model, self.cfg.data
        if m.probe and m.ema_decay:
            raise ConfigError("model.ema_decay applies to finetuning, not to the linear probe")
        self.train_src, self.val_src = class_folders(d.train, d.val, d.per_class)
        self.set_classes(len(self.train_src.classes))

    def plan_data(self) -> None:
        self.set_classes(PLAN_CLASSES)
        self.train_src = self.val_src = []

    def example_batch(self, batch: int, training: bool = True):
        size = self.cfg.data.img_size
        return (torch.randn(batch, 3, size, size),
                torch.randint(0, self.num_classes, (batch,)), torch.arange(batch))  # fmt: skip

    def plan_evaluation(self, model, batch, device):
        return model(batch[0].to(device))

    def set_classes(self, num_classes: int) -> None:
        d = self.cfg.data
        self.num_classes = num_classes
        if d.mixup > 0 or d.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix,
                               label_smoothing=d.label_smoothing,
                               num_classes=num_classes)  # fmt: skip

    def build_model(self, device: torch.device) -> nn.Module:
        e, m = self.cfg.encoder, self.cfg.model
        sd, enc_cfg = encoder_of(e)
        if sd is None:  # the baseline: same architecture, untrained encoder
            torch.manual_seed(e.seed)
            sd = VisionTransformer(**enc_cfg).state_dict()
        model = classifier_on(sd, enc_cfg, self.cfg, self.num_classes)
        self.encoder_config = enc_cfg
        model.to(device)
        if m.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=m.ema_decay)
        log.info("%d classes, %d train / %d val images", self.num_classes, len(self.train_src),
                 len(self.val_src))  # fmt: skip
        return model

    def train_set(self):
        return Indexed(Labelled(self.train_src, training_transform(self.cfg), skip_unreadable=True))

    def inputs(self, batch, device: torch.device) -> dict:
        imgs, y, _ = batch  # images, labels, the indices read
        imgs, y = imgs.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if self.mixup is not None:
            imgs, y = self.mixup(imgs, y)
        return {"imgs": imgs, "y": y}

    def losses(self, model, imgs: torch.Tensor, y: torch.Tensor) -> dict:
        return {"loss": self.criterion(model(imgs).float(), y)}

    def evaluation(self) -> Evaluation:
        return Evaluation(
            self._evaluate,
            every_epochs=1,
            line=self._line,
            tables=self._tables,
            best="top1",
            prefix="val_",
            curve={"top1": "top-1", "top5": "top-5"},
        )

    def _evaluate(self, step: int) -> dict:
        size, precision = self.cfg.data.img_size, self.cfg.eval.precision
        acc = evaluate_classifier(self.model, self.val_src, size, precision=precision)
        if self.ema is not None:
            acc["ema"] = evaluate_classifier(self.ema.module, self.val_src, size,
                                             precision=precision)  # fmt: skip
        return acc

    def _line(self, metrics: dict) -> str:
        top5 = f" top-5 {metrics['top5']:.2f}" if metrics["top5"] is not None else ""
        return f"top-1 {metrics['top1']:.2f}{top5}"

    def _tables(self, metrics: dict) -> str:
        return format_classes({"top-1": metrics["per_class"]})

    def checkpoint_fields(self) -> dict:
        state = {"encoder_config": self.model.config, "classes": self.train_src.classes}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def restore(self, ckpt: dict) -> None:
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["ema"])

    def hooks(self) -> list[Hook]:
        return [EmaUpdate(self.ema, self.model)] if self.ema is not None else []

    def result_fields(self, result: dict) -> dict:
        return {"last": result["metrics"] or {}}


def file_signature(files: list[Path]) -> str:
    """A digest of files' names, sizes and modification times (what changes when a file is
    replaced, added or removed)."""
    h = hashlib.sha1()
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def classifier_on(state_dict: dict, encoder_config: dict, cfg, num_classes: int) -> nn.Module:
    """The classifier of a finetune / linprobe config on encoder weights: finetuning's head
    initialised as MAE's (std 2e-5), the linear probe's a BatchNorm + Linear on a frozen ViT."""
    m = cfg.model
    model = build_classifier(state_dict, encoder_config, num_classes=num_classes,
                             img_size=cfg.data.img_size, global_pool=m.global_pool,
                             drop_path_rate=m.drop_path_rate)  # fmt: skip
    if m.probe:  # frozen encoder; only the BatchNorm + Linear head trains
        model.requires_grad_(False)
        model.head = ProbeHead(model.embed_dim, num_classes)
    else:
        nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE finetune head init
    return model


def cifar_subset(shared: Path, dest: Path, classes: int = 3) -> Path:
    """A small CIFAR-10 ImageFolder (links to the shared files): ``classes`` classes, 8 training
    and 4 val images each."""
    cifar = shared / "data" / "cifar10"
    for split, src, n in (("train", "train", 8), ("val", "test", 4)):
        for cls_dir in sorted((cifar / src).iterdir())[:classes]:
            out = dest / split / cls_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                if not (out / f.name).exists():
                    (out / f.name).symlink_to(f.resolve())
    return dest


@register_task
class LinprobeTask(FinetuneTask):
    """The paper's linear probe: the finetuning loop on a frozen encoder (module docstring)."""

    name = "linprobe"
    command = ("cls", "linprobe")
    help = "the paper's linear probe (frozen encoder, LARS)"
    schema = LinprobeConfig
    transfer = TransferStage("linprobe", 1, "configs/cls/linprobe_vit_{size}.yaml", IMAGENET,
                             (("linear probe top-1", ("linear_probe_top1",)),),
                             headline=partial(classifier_headline, "linear_probe_top1"),
                             smoke=partial(classifier_smoke, "linprobe"))  # fmt: skip


@register_task
class FrozenTask(Task):
    """kNN (top-1 / top-5 for each of ``knn.ks``) and dinov2's grid of fast linear probes (base
    lr x last-n blocks x pooling, ``probe``), the best reported, on features of a frozen
    encoder's last blocks, extracted once (cached in ``data.cache_dir``)."""

    name = "frozen"
    command = ("cls", "frozen")
    help = "kNN and fast linear probe of a frozen encoder"
    schema = FrozenEvalConfig
    transfer = TransferStage("frozen", 0, "configs/cls/frozen_vit_{size}.yaml", IMAGENET,
                             (("kNN top-1", ("knn_top1",)),
                              ("fast linear probe top-1", ("fast_probe_top1",))),
                             default=False, curve=True, headline=frozen_headline,
                             smoke=frozen_smoke,
                             scores_encoders=EncoderScore(frozen_ablation_settings,
                                                          frozen_scores))  # fmt: skip

    def open_data(self) -> None:
        self.train_src, self.val_src = class_folders(self.cfg.data.train, self.cfg.data.val)

    def build_model(self, device: torch.device) -> nn.Module:
        """The encoder of the checkpoint (or its architecture untrained), at ``data.img_size``."""
        e = self.cfg.encoder
        sd, cfg = encoder_of(e)
        asked = list(self.cfg.probe.n_blocks)
        self.n_blocks = sorted({min(n, cfg["depth"]) for n in asked})
        if max(asked) > cfg["depth"]:
            log.warning("probe.n_blocks=%s: the encoder has %d blocks; the grid uses %s", asked,
                        cfg["depth"], self.n_blocks)  # fmt: skip
        torch.manual_seed(e.seed)
        encoder = VisionTransformer(**cfg)
        if sd is not None:
            encoder.load_state_dict(sd, strict=True)
        size = self.cfg.data.img_size
        if tuple(encoder.img_size) != (size, size):
            encoder.set_img_size(size)
        return encoder

    def features(self, split) -> tuple[torch.Tensor, torch.Tensor]:
        """Block features (N, n, 2, D) of the last n = max(``probe.n_blocks``) blocks, cached."""
        d, e = self.cfg.data, self.cfg.encoder
        blocks = max(self.n_blocks)
        if e.arch is not None:
            source = {"arch": e.arch, "arch_settings": dict(e.arch_settings)}
        else:
            ckpt = Path(e.checkpoint)
            source = {"checkpoint": str(ckpt.resolve()), "file": file_signature([ckpt])}
        # keyed by contents: the split's files (names, sizes, times) and labels, the encoder
        # file's, and every setting that shapes a feature
        key = {**source, "random_init": e.random_init, "seed": e.seed, "img_size": d.img_size,
               "blocks": blocks, "split": str(split.root.resolve()),
               "files": file_signature(split.files), "classes": list(split.classes),
               "labels": hashlib.sha1(str(split.labels).encode()).hexdigest(),
               "features": "block_features-v1 fp32 resize+center-crop"}  # fmt: skip
        return cached_features(d.cache_dir, key, lambda: extract_block_features(
            self.model, split, img_size=d.img_size, blocks=blocks, batch_size=d.batch_size,
            num_workers=d.num_workers, device=self.device))  # fmt: skip

    def evaluation(self) -> Evaluation:
        return Evaluation(self._with_control, line=self._line, tables=self._tables)

    def _with_control(self, step: int = 0) -> dict:
        """The evaluation; with ``control``, the same of the architecture untrained beside it
        (``control``: its numbers; ``gain``: this encoder's minus the control's)."""
        metrics = self._evaluate(step)
        if not self.cfg.control or self.cfg.encoder.random_init:
            return metrics
        cfg = copy.deepcopy(self.cfg)
        cfg.encoder.random_init, cfg.control = True, False
        log.info("control: the same architecture untrained (encoder.seed=%d), evaluated the "
                 "same way", cfg.encoder.seed)  # fmt: skip
        control = FrozenTask(cfg)
        control.device, control.train_src, control.val_src = (
            self.device, self.train_src, self.val_src)  # fmt: skip
        control.model = control.build_model(self.device)
        theirs = control._evaluate(step)
        keys = ("knn_top1", "knn_top5", "linprobe_top1", "linprobe_top5")
        metrics["control"] = {k: theirs[k] for k in keys}
        metrics["gain"] = {k: metrics[k] - theirs[k] for k in keys
                           if metrics[k] is not None and theirs[k] is not None}  # fmt: skip
        return metrics

    def _evaluate(self, step: int = 0) -> dict:
        log.info("features of %d training and %d validation images", len(self.train_src),
                 len(self.val_src))  # fmt: skip
        (ftr, ytr), (fva, yva) = self.features(self.train_src), self.features(self.val_src)
        c, k, p = len(self.train_src.classes), self.cfg.knn, self.cfg.probe
        pool = self.cfg.model.pool
        scores = knn_classify_ks(pooled(ftr, pool), ytr, pooled(fva, pool), num_classes=c,
                                 ks=sorted({*k.ks, k.k}), temperature=k.temperature)  # fmt: skip
        by_k = {kk: topk_accuracy(v, yva) for kk, v in scores.items()}
        knn_pred = scores[k.k].argmax(dim=1)
        n = len(ytr)  # a k beyond the training images votes with all of them: said, recorded
        used = {kk: min(kk, n) for kk in scores}
        if over := sorted(kk for kk in scores if kk > n):
            log.warning("knn: k = %s asked, but there are %d training images: each of these "
                        "uses k = %d", ", ".join(map(str, over)), n, n)  # fmt: skip
        for kk, v in by_k.items():
            v["k_used"] = used[kk]
        inputs = {f"last{n}_{q}": (pooled(ftr, q, n), pooled(fva, q, n))
                  for n in self.n_blocks for q in p.pools}  # fmt: skip
        probe = linear_probe_grid(
            inputs, ytr, yva, num_classes=c, blrs=list(p.blrs), epochs=p.epochs,
            warmup_epochs=p.warmup_epochs, batch_size=p.batch_size, weight_decay=p.weight_decay,
            seed=self.cfg.encoder.seed,
        )  # fmt: skip
        best = probe["best"]
        return {"checkpoint": self.cfg.encoder.checkpoint,
                "weights": "random init" if self.cfg.encoder.random_init else "pretrained",
                "train_images": len(self.train_src), "val_images": len(self.val_src),
                "knn_top1": by_k[k.k]["top1"], "knn_top5": by_k[k.k].get("top5"),
                "knn_k": used[k.k],
                "knn_by_k": {str(kk): v for kk, v in by_k.items()},
                "linprobe_top1": best["top1"], "linprobe_top5": best.get("top5"),
                "linprobe_best": {"input": best["input"], "blr": best["blr"]},
                "linprobe_grid": probe["grid"],
                "per_class": {"knn": per_class_of(knn_pred, yva, self.val_src),
                              "linprobe": per_class_of(probe["best_predictions"], yva,
                                                       self.val_src)}}  # fmt: skip

    def _line(self, metrics: dict) -> str:
        best = metrics["linprobe_best"]
        k, asked = metrics["knn_k"], self.cfg.knn.k
        k = f"{k}: all the training images, {asked} asked" if k != asked else k
        line = (f"kNN top-1 {metrics['knn_top1']:.2f} (k = {k}), linear probe "
                f"top-1 {metrics['linprobe_top1']:.2f} ({best['input']}, blr {best['blr']}: "
                f"the best of {len(metrics['linprobe_grid'])} on this split)")  # fmt: skip
        if (control := metrics.get("control")) is not None:
            gain = metrics["gain"]
            line += (f"; untrained control: kNN {control['knn_top1']:.2f} "
                     f"({gain['knn_top1']:+.2f}), probe {control['linprobe_top1']:.2f} "
                     f"({gain['linprobe_top1']:+.2f})")  # fmt: skip
        return line

    def _tables(self, metrics: dict) -> str:
        c = metrics["per_class"]
        return format_classes({"kNN top-1": c["knn"], "probe top-1": c["linprobe"]})


@register_bench_case("finetune")
def finetune_bench_case(tiny: bool, batch: int | None, device: torch.device) -> BenchCase:
    """ViT-B finetuning at 224 px, 128 images per GPU, bf16 (tiny: a 4-block 32-wide ViT)."""
    from crossmae.config import load_config

    enc = bench_encoder(tiny)
    batch = batch or 128
    cfg = load_config(FinetuneConfig, [], [f"data.img_size={enc['img_size']}"])
    task = FinetuneTask(cfg)
    task.set_classes(1000)
    model = classifier_on(VisionTransformer(**enc).state_dict(), enc, cfg, 1000).to(device)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, enc["img_size"], enc["img_size"], generator=g).to(device)
    ys = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return BenchCase(task, model, (imgs, ys, None), batch, "bf16",
                     lambda: model(imgs), eval_images=batch)  # fmt: skip
