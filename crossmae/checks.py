"""The validator language of the config schemas: a field declared with ``checked(default,
*checks)`` carries its checks (each a value -> what is wrong with it, or None), ``section`` a
shared section with a task's defaults, and ``problems_of`` runs every check of a loaded config
(``crossmae.config.load_config`` does), naming the key. Also the types of command-line options
that are numbers in a range."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

Check = Callable[[Any], str | None]  # a value -> what is wrong with it, or None


def checked(default: Any, *checks: Check, resumable: bool = False) -> Any:
    """A config field whose value must pass ``checks`` (each returns what is wrong, or None);
    ``load_config`` runs them and names the key. None (a setting that is off) is not checked.
    ``resumable``: a run may continue from a checkpoint with another value of this setting (how
    it logs, where or how fast it runs); any other change is refused on resume."""
    meta = {"checks": checks, "resumable": resumable}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(schema: type, *, resumable: bool = False, **defaults: Any) -> Any:
    """A config section of type ``schema`` whose defaults are ``defaults`` (a task's schema
    changes the shared sections' defaults this way, never their fields). ``resumable``: every
    setting of the section may change on resume (``log``, ``eval``)."""
    return field(default_factory=lambda: schema(**copy.deepcopy(defaults)),
                 metadata={"resumable": resumable})  # fmt: skip


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}"


def above(low: float) -> Check:
    return lambda v: None if v > low else f"must be greater than {low}"


def below(high: float) -> Check:
    return lambda v: None if v < high else f"must be less than {high}"


def at_most(high: float) -> Check:
    return lambda v: None if v <= high else f"must be at most {high}"


def one_of(*choices: Any) -> Check:
    return lambda v: None if v in choices else f"must be one of {list(choices)}"


def each(*checks: Check) -> Check:
    """Every item of a list passes ``checks``."""

    def check(values: Sequence) -> str | None:
        for v in values:
            for c in checks:
                if (problem := c(v)) is not None:
                    return f"each value {problem}"
        return None

    return check


def length(n: int) -> Check:
    return lambda v: None if len(v) == n else f"must have {n} values, got {len(v)}"


def increasing(v: Sequence) -> str | None:
    return None if all(a <= b for a, b in zip(v, v[1:], strict=False)) else "must be increasing"


def not_empty(v: Sequence) -> str | None:
    return None if len(v) else "must not be empty"


def registered_model(name: str) -> str | None:
    from .models import list_models

    return None if name in list_models() else "not a registered model (crossmae models)"


def in_table(table: str) -> Check:
    """The value is a key of ``crossmae.optim``'s table ``table`` (optimizers, schedules, ...)."""

    def check(value: str) -> str | None:
        from . import optim

        keys = list(getattr(optim, table))
        return None if value in keys else f"must be one of {keys}"

    return check


def fraction_option(text: str) -> float:
    """A command-line option's type: a number in [0, 1] (a score threshold)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """A command-line option's type: an integer of at least ``low`` (argparse names the option
    and the value when it is not)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


POSITIVE = above(0)
FRACTION = (at_least(0), below(1))  # [0, 1)
PRECISION = one_of("bf16", "fp16", "fp32")
TRAIN_PRECISION = one_of("auto", "bf16", "fp16", "fp32")  # auto: bf16 on a GPU, fp32 on a CPU
DEVICE = one_of("auto", "cpu", "cuda")


def GIB_OR_AUTO(v: Any) -> str | None:  # noqa: N802 - a check, named as the constants above
    if v == "auto" or (isinstance(v, int | float) and not isinstance(v, bool) and v > 0):
        return None
    return "must be a positive number of GiB, or auto (this process's GPU's own memory)"


def problems_of(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every value of ``cfg`` that fails its field's checks, and every ``cross_checks`` problem
    of its sections (a dataclass's static method: the section -> {key: problem}), as
    ``key=value: problem``."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return []
    found = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if OmegaConf.is_missing(cfg, f.name):
            continue
        value = cfg[f.name]
        if isinstance(value, DictConfig):
            found += problems_of(value, key + ".")
            continue
        if value is None:
            continue
        plain = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        if isinstance(plain, float) and not math.isfinite(plain):
            found.append(f"{key}={plain}: must be a finite number")
            continue
        if f.name == "seed" and isinstance(plain, int) and not 0 <= plain < 2**32:
            found.append(f"{key}={plain}: a seed must be in 0 .. 2**32 - 1")
            continue
        for check in f.metadata.get("checks", ()):
            if (problem := check(plain)) is not None:
                found.append(f"{key}={plain}: {problem}")
                break
    cross = getattr(schema, "cross_checks", None)
    if cross is not None:
        found += [f"{prefix}{k}: {v}" for k, v in cross(cfg).items()]
    return found
