"""The one optimiser / schedule implementation: schedules by name, parameter groups by rule,
the lr rule, and an optimizer from an ``optim`` section."""

from __future__ import annotations

import pytest
import torch

from crossmae.config import OptimConfig, load_config
from crossmae.models import VisionTransformer
from crossmae.optim import (
    SCHEDULES,
    build_optimizer,
    cosine_lr,
    make_schedule,
    optimizer_groups,
    param_groups,
    peak_lr,
)


def optim(*settings: str):
    """An ``optim`` section with ``settings`` (as a command line gives them)."""
    from dataclasses import dataclass, field

    @dataclass
    class Schema:
        optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.0))

    return load_config(Schema, [], [f"optim.{s}" for s in settings]).optim


def test_warmup_then_cosine():
    kw = dict(base_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert cosine_lr(0, **kw) == 0.0
    assert cosine_lr(5, **kw) == pytest.approx(0.5)
    assert cosine_lr(10, **kw) == pytest.approx(1.0)
    assert cosine_lr(60, **kw) == pytest.approx(0.55)  # half way down the cosine
    assert cosine_lr(110, **kw) == pytest.approx(0.1)
    assert cosine_lr(500, **kw) == pytest.approx(0.1)
    lrs = [cosine_lr(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert cosine_lr(0, **kw, warmup_start=0.1) == pytest.approx(0.1)


def test_every_schedule_is_chosen_by_name_and_warms_up_from_its_start():
    for name in SCHEDULES:
        o = optim(f"schedule={name}", "warmup_steps=10", "warmup_start=0.01", "milestones=[50]")
        s = make_schedule(o, 2.0, 100, steps_per_epoch=7)
        assert s(0) == pytest.approx(0.02), name
        assert s(10) == pytest.approx(2.0, rel=0.1), name  # poly: already 10 % down
        assert s(99) < s(10), name
    # multistep: x gamma at each milestone (detectron2); poly: (1 - step / total) ** power
    s = make_schedule(optim("schedule=multistep", "milestones=[5,8]", "gamma=0.5"), 1.0, 10, 1)
    assert [s(i) for i in (4, 5, 8)] == [1.0, 0.5, 0.25]
    s = make_schedule(optim("schedule=poly", "power=2.0"), 1.0, 10, 1)
    assert s(5) == pytest.approx(0.25)
    # warmup in epochs: rounded to whole steps of this run
    assert make_schedule(optim("warmup_epochs=1.5"), 1.0, 100, 7).warmup_steps == 10


def test_the_lr_rule_and_what_a_section_must_say():
    o = optim("lr=null", "blr=1.5e-4")
    assert peak_lr(o, 4096) == pytest.approx(2.4e-3)
    assert peak_lr(o, 4096, 0.25 / 0.75) == pytest.approx(0.8e-3)  # CrossMAE: x γ / p
    assert peak_lr(optim("lr=0.1", "blr=1.0"), 4096) == 0.1  # lr wins
    from crossmae.config import ConfigError

    with pytest.raises(ConfigError, match="set optim.lr .* or optim.blr"):
        optim("lr=null")
    with pytest.raises(ConfigError, match="both set"):
        optim("warmup_steps=3", "warmup_epochs=1")
    with pytest.raises(ConfigError, match=r"optim.schedule=cosnie: must be one of \['cosine'"):
        optim("schedule=cosnie")
    with pytest.raises(ConfigError, match="each value must be one of"):
        optim("no_weight_decay=[bias]")


def test_no_decay_rules_and_layer_decay():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model.pos_embed.requires_grad_(True)
    groups = param_groups(model, 0.05, no_weight_decay=["1d", "pos_embed", "cls_token"],
                          layer_decay=0.5, layer_id=model.layer_id, num_layers=2)  # fmt: skip
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    for n in ("blocks.0.attn.qkv.bias", "blocks.1.norm1.weight", "cls_token", "pos_embed"):
        assert by_name[n]["weight_decay"] == 0.0, n
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == 0.5**3
    assert by_name["blocks.1.mlp.fc1.weight"]["lr_scale"] == 0.5**1
    assert by_name["norm.weight"]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # detectron2's rule: every bias decayed, the LayerNorms and the position table not
    by_name = {n: g for g in param_groups(model, 0.1, no_weight_decay=["layernorm", "pos_embed"])
               for n in g["names"]}  # fmt: skip
    assert by_name["blocks.0.attn.qkv.bias"]["weight_decay"] == 0.1
    assert by_name["blocks.0.norm1.bias"]["weight_decay"] == 0.0
    assert by_name["pos_embed"]["weight_decay"] == 0.0
    assert by_name["cls_token"]["weight_decay"] == 0.1


def test_a_section_builds_the_optimizer_and_groups_of_the_models_layers():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    o = optim("weight_decay=0.05", "layer_decay=0.5")
    groups = optimizer_groups(model, o)  # layer_id / num_layers: the model's
    assert {g["lr_scale"] for g in groups} == {0.5**3, 0.5**2, 0.5, 1.0}
    assert isinstance(build_optimizer(groups, 1e-3, o, torch.device("cpu")), torch.optim.AdamW)
    lars = build_optimizer(optimizer_groups(model, optim("name=lars")), 0.1, optim("name=lars"),
                           torch.device("cpu"))  # fmt: skip
    assert type(lars).__name__ == "LARS"
    with pytest.raises(ValueError, match="has no layer_id"):
        optimizer_groups(torch.nn.Linear(2, 2), o)
