"""The online linear probe of pretraining (solo-learn's online linear evaluation): with a
labelled class-folder tree as ``data.path`` and a held-out split of the same classes as
``probe.val``, a linear head (BatchNorm + Linear, MAE's probe head) learns to classify the
encoder's cls token of each training batch alongside pretraining, and its top-1 on the
held-out split is logged every ``probe.every_epochs`` epochs.

The encoder never sees the head: after each optimizer step the head reads the cls token of the
batch's full (unmasked) crops from a no-grad forward in eval mode (no dropout or drop-path
draw), with its own optimizer and its own random stream, so the encoder's weights are
bit-identical with and without the probe (tested). Its state is in every checkpoint: a resumed
run continues the head too.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as du
from .config import ConfigError
from .data import ImageFiles, normalize_pixels
from .engine import Engine, Hook
from .hooks import evaluation_failed
from .knn import extract_features

log = logging.getLogger("crossmae")


def probe_splits(train: str | None, val: str) -> ImageFiles:
    """The held-out split, checked against the pretraining tree: both class folders, the same
    classes in the same order."""
    if not train:
        raise ConfigError("probe.val needs data.path: a class-folder tree whose labels the "
                          "online probe learns")  # fmt: skip
    tr, va = ImageFiles(train), ImageFiles(val)
    for split in (tr, va):
        if split.layout != "imagefolder" or len(split.classes) < 2:
            raise ConfigError(f"the online probe needs class folders (2 or more): {split.root}")
    if tr.classes != va.classes:
        raise ConfigError(f"data.path and probe.val have other classes ({len(tr.classes)} and "
                          f"{len(va.classes)} folders, or another order)")  # fmt: skip
    return va


class OnlineProbe(Hook):
    """Trains the head after every update and evaluates it every ``every_epochs`` epochs (an
    evaluation: after the step's checkpoint; a failure is ``evaluation_failed``'s).

    Args:
        task: the pretraining task (its model, ``last_batch``: the crops and labels of the last
            micro-batch of the step).
        val: the held-out split.
        lr: the head's SGD lr (momentum 0.9).
        every_epochs: evaluation interval.
        seed: the head's initialisation.
    """

    name = "online_probe"

    evaluation = True

    def __init__(self, task, val: ImageFiles, *, lr: float, every_epochs: int, seed: int):
        self.task, self.val, self.every_epochs = task, val, every_epochs
        encoder = task.model.encoder
        with torch.random.fork_rng(devices=[]):  # the run's own streams stay as they were
            torch.manual_seed(seed)
            self.head = nn.Sequential(nn.BatchNorm1d(encoder.embed_dim, affine=False),
                                      nn.Linear(encoder.embed_dim, len(val.classes)))  # fmt: skip
            nn.init.trunc_normal_(self.head[1].weight, std=0.01)
            nn.init.zeros_(self.head[1].bias)
        self.head.to(task.device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=0.9)
        self.last: dict | None = None

    def after_update(self, engine: Engine) -> None:
        batch = self.task.last_batch  # (crops, labels) of the step just taken
        encoder = self.task.model.encoder
        was_training = encoder.training
        encoder.eval()
        with torch.no_grad():
            x = batch[0] if batch[0].is_floating_point() else normalize_pixels(batch[0])
            feats = encoder.forward_features(x)[:, 0].float()
        encoder.train(was_training)
        loss = F.cross_entropy(self.head(feats), batch[1])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.head.parameters():  # every process's head sees every process's batch
            if p.grad is not None and du.is_dist():
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
        self.optimizer.step()

    def after_epoch(self, engine: Engine) -> None:
        epoch = engine.step // engine.steps_per_epoch
        if self.every_epochs and epoch % self.every_epochs == 0:
            try:
                self.evaluate(engine, epoch)
            except Exception as e:  # noqa: BLE001 - evaluation_failed re-raises what it cannot keep
                stop = self.task.cfg.train.stop_on_eval_error
                evaluation_failed(engine, "the online probe's evaluation", e, stop)

    @torch.no_grad()
    def evaluate(self, engine: Engine, epoch: int) -> dict:
        cfg = self.task.cfg
        with torch.random.fork_rng(devices=[]):  # loader workers draw a seed: not the run's
            feats, labels = extract_features(self.task.model.encoder, self.val,
                                             img_size=cfg.model.img_size, pool="cls",
                                             num_workers=cfg.data.num_workers,
                                             device=self.task.device)  # fmt: skip
        self.head.eval()
        pred = self.head(feats.to(self.task.device)).argmax(dim=1).cpu()
        self.head.train()
        top1 = 100.0 * (pred == labels).double().mean().item()
        self.last = {"step": engine.step, "epoch": epoch, "top1": top1}
        engine.record({"step": engine.step, "epoch": epoch, "online_probe_top1": top1},
                      "online_probe")  # fmt: skip
        log.info("online probe, epoch %d: top-1 %.2f on %d held-out images", epoch, top1,
                 len(labels))  # fmt: skip
        return self.last

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "last": self.last}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if "head" in state:
            self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.last = state.get("last")
