"""Typed configuration: dataclass schemas merged by OmegaConf from YAML files and ``key=value``
overrides in struct mode, so a misspelled key or a wrongly typed value is an error naming it.

The sections every task shares live here (their validators in ``crossmae.checks``); each task's
schema lives beside the task (pretraining's ``PretrainConfig`` in ``crossmae.pretrain``: the
laptop demo, a small CrossMAE on scikit-image's photos, a few CPU minutes;
``configs/pretrain/*.yaml`` hold the paper's settings as diffs against it).
Derived values (the actual learning rate, step counts) are computed by the code that uses them and
logged; they are never written back here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checks import (
    DEVICE,
    FRACTION,
    GIB_OR_AUTO,
    POSITIVE,
    TRAIN_PRECISION,
    above,
    at_least,
    at_most,
    checked,
    each,
    in_table,
    increasing,
    length,
    problems_of,
    registered_model,
)


# ----------------------------------------------------------------------------- shared sections
@dataclass
class EncoderSource:
    """The encoder a transfer task starts from (``encoder.*``): a pretrained checkpoint, or with
    ``arch`` (and ``checkpoint: null``) a registered model's encoder, untrained (the overfit
    checks of ``configs/*/overfit_*.yaml``)."""

    # one of our checkpoint-last.pt / encoder.pt, or an official release
    checkpoint: str | None = "???"
    official_arch: str | None = None  # for official files: e.g. crossmae_vit_base_patch16
    random_init: bool = False  # the checkpoint's architecture, untrained (a baseline)
    # instead of a checkpoint: this registered model's encoder, untrained, built with
    # ``arch_settings`` (e.g. {img_size: 32, patch_size: 4}); ``crossmae models`` lists them
    arch: str | None = checked(None, registered_model)
    arch_settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @staticmethod
    def cross_checks(e: DictConfig) -> dict[str, str]:
        if OmegaConf.is_missing(e, "checkpoint"):
            return {}
        if e.arch is not None and e.checkpoint is not None:
            return {"arch": f"{e.arch} and encoder.checkpoint={e.checkpoint} are both set: "
                            "set encoder.checkpoint=null for an untrained encoder"}  # fmt: skip
        if e.arch is None and e.checkpoint is None:
            return {"checkpoint": "null needs encoder.arch (an untrained encoder of a registered "
                                  "model); else name a pretrained checkpoint"}  # fmt: skip
        return {}


@dataclass
class OptimConfig:
    """The optimiser and its lr schedule, one schema for every training command (``optim.*``).
    A task's schema changes its defaults only (``section(OptimConfig, ...)``).

    The peak lr is ``lr``, or ``blr x train.batch_size / 256`` (times γ / p for CrossMAE
    pretraining, paper App. A.6); the schedule (``crossmae.optim.SCHEDULES``) warms up linearly
    from ``warmup_start x lr`` over ``warmup_steps`` (or ``warmup_epochs``) steps, then: ``cosine``
    (half cosine to ``min_lr``, MAE), ``multistep`` (x ``gamma`` at each of ``milestones``,
    detectron2), ``poly`` (``(1 - step / total) ** power`` times the warmup factor, mmseg 0.x),
    ``linear_poly`` (LinearLR then PolyLR, mmseg 1.x). Each parameter group's lr is scaled by
    ``layer_decay ** (depth + 1 - layer)`` with layer decay; the parameters ``no_weight_decay``
    names (``crossmae.optim.NO_WEIGHT_DECAY``) get no weight decay.
    """

    name: str = checked("adamw", in_table("OPTIMIZERS"))
    lr: float | None = checked(None, POSITIVE)  # absolute peak lr (wins over blr)
    blr: float | None = checked(None, POSITIVE)  # base lr per 256 images
    min_lr: float = checked(0.0, at_least(0))
    weight_decay: float = checked(0.0, at_least(0))
    no_weight_decay: list[str] = checked(["1d"], each(in_table("NO_WEIGHT_DECAY")))
    layer_decay: float | None = checked(None, above(0), at_most(1))  # None = no layer decay
    betas: list[float] = checked([0.9, 0.999], length(2), each(*FRACTION))  # AdamW
    schedule: str = checked("cosine", in_table("SCHEDULES"))
    warmup_epochs: float | None = checked(None, at_least(0))
    warmup_steps: int | None = checked(None, at_least(0))
    warmup_start: float = checked(0.0, at_least(0), at_most(1))  # lr factor at step 0
    milestones: list[int] = checked([], increasing, each(POSITIVE))  # multistep, in steps
    gamma: float = checked(0.1, above(0), at_most(1))  # multistep decay factor
    power: float = checked(1.0, above(0))  # poly schedules
    clip_grad: float | None = checked(None, POSITIVE)  # max gradient norm; None = no clipping

    @staticmethod
    def cross_checks(o: DictConfig) -> dict[str, str]:
        found = {}
        if o.lr is None and o.blr is None:
            found["lr"] = "set optim.lr (absolute) or optim.blr (per 256 images)"
        if o.warmup_epochs is not None and o.warmup_steps is not None:
            found["warmup_steps"] = (f"{o.warmup_steps} and optim.warmup_epochs={o.warmup_epochs}"
                                     " are both set: set the other to null")  # fmt: skip
        return found


@dataclass
class RunConfig:
    """Where and with which seed a command runs (``train.*`` of an evaluation command)."""

    device: str = checked("auto", DEVICE, resumable=True)
    seed: int = 0


@dataclass
class TrainConfig(RunConfig):
    """What every training command shares (``train.*``): the length of training in ``epochs``
    or ``steps`` (one of them), the global batch, precision, device, seed."""

    epochs: int | None = checked(None, POSITIVE)
    steps: int | None = checked(None, POSITIVE)
    batch_size: int = checked(128, POSITIVE)  # global batch (all processes, accumulation steps)
    # per-process forward; None = batch / processes
    micro_batch: int | None = checked(None, POSITIVE, resumable=True)
    # GiB of one GPU (auto: this process's GPU's own): before the first step, the largest
    # micro-batch whose planned memory (crossmae.memory) fits is chosen, the accumulation keeping
    # the batch; None = micro_batch
    gpu_memory: Any = checked(None, GIB_OR_AUTO, resumable=True)
    # recompute the backbone blocks' activations in backward (less memory, more compute; chosen
    # by train.gpu_memory when even the smallest micro-batch does not fit without it)
    activation_checkpointing: bool = checked(False, resumable=True)
    # stop after this many steps, the schedule unchanged (smoke runs)
    max_steps: int | None = checked(None, POSITIVE, resumable=True)
    # autocast: auto = bf16 on a GPU, fp32 on a CPU (most CPUs emulate bf16, many times slower)
    precision: str = checked("auto", TRAIN_PRECISION)
    max_nonfinite_steps: int = checked(5, POSITIVE)  # non-finite losses in a row stop the run
    # resuming with other settings than the checkpoint's is refused unless this is true
    resume_with_changes: bool = checked(False, resumable=True)
    # an evaluation inside training that fails (an unreadable val image) ends the run, its
    # checkpoint written first; false: reported and recorded, and training goes on
    stop_on_eval_error: bool = checked(False, resumable=True)

    @staticmethod
    def cross_checks(t: DictConfig) -> dict[str, str]:
        if (t.epochs is None) == (t.steps is None):
            return {"steps": f"{t.steps} and train.epochs={t.epochs}: set exactly one of them "
                             "(the other to null)"}  # fmt: skip
        return {}


@dataclass
class LogConfig:
    """What every training command shares (``log.*``); every setting may change on resume."""

    every_steps: int = checked(10, POSITIVE)  # metrics.jsonl / TensorBoard / progress interval
    ckpt_every_steps: int = checked(0, at_least(0))  # checkpoint-last.pt every N steps (0: never)
    ckpt_every_epochs: int = checked(0, at_least(0))  # and / or every N epochs (0: never)
    keep_every_epochs: int = checked(0, at_least(0))  # keep encoder-epochN.pt (0 = never)
    tensorboard: bool = True
    progress: bool = True  # a progress bar on a terminal (a log line per record everywhere)


@dataclass
class EvalConfig:
    """What every task's evaluation shares (``eval.*``; ``crossmae.evaluation``)."""

    # the evaluation's autocast; auto: the training's (train.precision)
    precision: str = checked("auto", TRAIN_PRECISION)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def load_config(
    schema: type,
    files: list[str | Path] = (),
    overrides: list[str] = (),
    base: dict[str, Any] | None = None,
    complete: bool = False,
) -> DictConfig:
    """Schema defaults <- ``base`` (e.g. a checkpoint's config) <- each YAML file in order <-
    ``key=value`` overrides, in struct mode.

    A file may mark a value ``???`` (e.g. ``data.path``): it must then be set by a later file or
    an override. Raises ConfigError naming the offending key (unknown key, wrong type, missing
    required value, unreadable file); ``complete``: also every value the schema leaves open.
    """
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    _open_free_dicts(cfg)
    required: set[str] = set()  # keys a file marks "???": a later file or an override must set them
    try:
        if base is not None:
            cfg = OmegaConf.merge(cfg, base)
        for f in files:
            for diff in _file_chain(Path(f)):
                required |= set(OmegaConf.missing_keys(diff))
                cfg = OmegaConf.merge(cfg, diff)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be key=value, got {bad}")
        cfg = OmegaConf.merge(cfg, _dotlist(cfg, overrides))
    except OmegaConfBaseException as e:
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"config key {getattr(e, 'full_key', '?')!r}: {msg}") from None
    missing = sorted(k for k in required if OmegaConf.select(cfg, k) is None)
    if complete:  # a command about to run: every value the schema leaves open must be set
        missing = sorted({*missing, *OmegaConf.missing_keys(cfg)})
    if missing:
        raise ConfigError(f"set the required value(s) {missing}, e.g. {missing[0]}=...")
    if problems := problems_of(cfg):
        raise ConfigError("; ".join(problems))
    return cfg


def _dotlist(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``key=value`` overrides as a config, each value taken as its field's type: a text field
    (a path, a name) keeps the text given, character for character (``output_dir=0123`` is
    "0123", ``no`` is "no", ``run #1`` keeps its ``#1``), ``null`` being its one word for None; an
    empty text is an error naming the key (an unset shell variable, most often). Other fields
    read the value as YAML (``12``, ``1e-6``, ``true``, ``[1, 2]``)."""
    items = []
    for item in overrides:
        key, raw = item.split("=", 1)
        if _is_text(cfg, key.strip()):
            if raw.strip() == "":
                raise ConfigError(f"{key}= has no value (an unset variable?): give one, or leave "
                                  f"{key} out for its default")  # fmt: skip
            item = f"{key}={raw if raw == 'null' else json.dumps(raw)}"
        items.append(item)
    try:
        return OmegaConf.from_dotlist(items)
    except yaml.YAMLError as e:
        where = next((o for o in overrides if _yaml_error(o)), overrides[0])
        raise ConfigError(
            f"{where!r} is not a value YAML can read "
            f"({getattr(e, 'problem', None) or str(e).splitlines()[0]})"
        ) from None


def _yaml_error(item: str) -> bool:
    try:
        OmegaConf.from_dotlist([item])
    except yaml.YAMLError:
        return True
    except Exception:  # noqa: BLE001 - only YAML's errors are looked for here
        return False
    return False


def _is_text(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` names a text field (``str`` or ``str | None``) of ``cfg``'s schema."""
    from omegaconf.nodes import StringNode

    parent, _, leaf = key.rpartition(".")
    try:
        node = (OmegaConf.select(cfg, parent) if parent else cfg)._get_node(leaf)
    except Exception:  # noqa: BLE001 - an unknown key: the merge names it
        return False
    return isinstance(node, StringNode)


BASE_KEY = "_base_"


def _file_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """A config file and the files it builds on, base first: a file's ``_base_: other.yaml``
    (relative to the file) is read before it, so a large model's file holds only what differs
    from the base one."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file (give a YAML file in it)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: {BASE_KEY} chain loops back to itself")
    try:
        diff = OmegaConf.load(path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a config is YAML text)") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(diff, DictConfig):
        raise ConfigError(f"{path}: a config file holds key: value settings, not {type(diff)}")
    if BASE_KEY not in diff:
        return [diff]
    base = diff.pop(BASE_KEY)
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {BASE_KEY} must be one file name, got {base!r}")
    return [*_file_chain(path.parent / base, (*seen, path.resolve())), diff]


def _open_free_dicts(cfg: DictConfig) -> None:
    """Free-form ``dict[str, Any]`` fields (e.g. ``model.kwargs``) accept new keys."""
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            if OmegaConf.get_type(node) is dict:
                OmegaConf.set_struct(node, False)
            else:
                _open_free_dicts(node)


def resumable(cfg: DictConfig, key: str) -> bool:
    """Whether the setting ``key`` (dotted) of ``cfg`` may change when a run resumes: its field,
    or a section above it, is declared ``resumable`` in the schema."""
    node: Any = cfg
    for part in key.split("."):
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if schema is None or not dataclasses.is_dataclass(schema):
            return False
        spec = {f.name: f for f in dataclasses.fields(schema)}.get(part)
        if spec is None:
            return False
        if spec.metadata.get("resumable"):
            return True
        node = node[part]
    return False


def changed_settings(saved: dict, now: DictConfig) -> list[str]:
    """``key: saved -> now`` for every setting of ``now`` that differs from the ``saved`` config
    (a checkpoint's) and may not change on resume (``resumable``)."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved), flat(to_plain(now))
    keys = sorted(k for k in a.keys() | b.keys()
                  if not _same_setting(a.get(k), b.get(k)) and not resumable(now, k))  # fmt: skip
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in keys]


def _same_setting(a: Any, b: Any) -> bool:
    """Equal values, or two spellings of one existing file or folder (``runs/x/encoder.pt``
    written relative now, absolute when the run started)."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (here): not shown to be the same
        return False


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """A resolved plain-dict copy (for checkpoints and logs)."""
    return OmegaConf.to_container(cfg, resolve=True)


def without_missing(values: dict) -> dict:
    """``values`` (a saved config) less its unset (``???``) entries, at every depth."""
    return {k: without_missing(v) if isinstance(v, dict) else v
            for k, v in values.items() if v != "???"}  # fmt: skip


def parse_settings(items: list[str]) -> dict:
    """``key=value`` strings (a command's settings) -> a dict of typed values (YAML: 12, 1e-06,
    true, [-1])."""
    bad = [item for item in items if "=" not in item or item.startswith("=")]
    if bad:
        raise ConfigError(f"settings must be key=value, got {bad}")
    return OmegaConf.to_container(OmegaConf.from_dotlist(items))
