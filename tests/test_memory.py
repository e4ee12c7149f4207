"""The memory planner (crossmae.memory, ``crossmae benchmark memory``): bytes counted as the CUDA
caching allocator counts them, data-dependent sizes bounded by their worst case, and a training
step's peak split into its parts, all on fake tensors in seconds."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO

from crossmae.cli import main
from crossmae.config import load_config
from crossmae.memory import BLOCK, LiveBytes, allocated_bytes, fake_tensors, plan_memory
from crossmae.task import get_task

# a 4-block 64-wide CrossMAE on 32-px images: planned in about a second
TINY = ["model.name=crossmae_vit_tiny_patch8", "model.img_size=32",
        "model.kwargs={embed_dim: 64, depth: 4, num_heads: 2, decoder_embed_dim: 32, "
        "decoder_num_heads: 2}", "model.decoder_depth=2", "data.path=unused", "train.batch_size=32",
        "train.precision=fp32"]  # fmt: skip


def tiny_plan(*settings: str, gpus: int = 1):
    task = get_task("pretrain")
    cfg = load_config(task.schema, [], [*TINY, *settings], complete=True)
    return plan_memory(task, cfg, gpus, name="tiny")


def test_allocations_are_counted_as_the_caching_allocator_rounds_them():
    assert allocated_bytes(0) == 0
    assert allocated_bytes(1) == allocated_bytes(BLOCK) == BLOCK
    assert allocated_bytes(BLOCK + 1) == 2 * BLOCK
    with fake_tensors(), LiveBytes() as mode:
        a = torch.empty(1000)  # 4000 bytes -> 4096
        assert mode.current == 4096
        b = a.view(10, 100)  # a view: no new storage
        c = a * 2
        assert mode.current == 8192 and mode.peak == 8192
        del a, b, c
        assert mode.current == 0 and mode.peak == 8192  # freed when the last reference goes
        torch.empty(3, dtype=torch.float16)  # 6 bytes -> 512, freed at once
        assert mode.current == 0 and mode.peak == 8192


def test_data_dependent_sizes_take_their_worst_case():
    with fake_tensors(), LiveBytes():
        x = torch.randn(10, 3)
        assert x[x[:, 0] > 0].shape == (10, 3)  # every row selected
        assert torch.nonzero(x > 0).shape == (30, 2)
        assert torch.nonzero(x[:, 0] > 0, as_tuple=True)[0].shape == (10,)
        x[x > 0] = 0.0  # a masked assignment plans too
        from torchvision.ops import nms

        assert nms(torch.rand(7, 4), torch.rand(7), 0.5).shape == (7,)  # every box kept


def test_a_training_step_is_split_into_parameters_gradients_optimizer_and_activations():
    plan = tiny_plan()
    task = get_task("pretrain")
    cfg = load_config(task.schema, [], TINY, complete=True)
    from crossmae.pretrain import build_model

    real = build_model(cfg.model)
    params = sum(allocated_bytes(t.numel() * t.element_size())
                 for t in [*real.parameters(), *real.buffers()])  # fmt: skip
    trained = sum(allocated_bytes(p.numel() * 4) for p in real.parameters() if p.requires_grad)
    assert plan.parts["parameters"] == params
    # AdamW: two moments per trained parameter and a step count per tensor
    assert (
        2 * trained
        <= plan.parts["optimizer"]
        <= 2 * trained + 512 * 2 * len(list(real.parameters()))
    )
    assert plan.parts["activations"] > 0
    assert plan.peak == sum(plan.parts.values())
    row = plan.row(80)
    assert row["fits"] and row["batch_per_gpu"] == 32 and row["peak_gib"] > 0


def test_accumulation_and_more_gpus_shrink_the_activations_only():
    full = tiny_plan()
    split = tiny_plan("train.micro_batch=8")
    assert (split.micro_batch, split.accumulation) == (8, 4)
    assert split.parts["parameters"] == full.parts["parameters"]
    assert split.parts["activations"] < full.parts["activations"] / 2
    four = tiny_plan(gpus=4)
    assert (four.batch_per_gpu, four.accumulation) == (8, 1)
    assert four.parts["activations"] < full.parts["activations"] / 2


def test_memory_command_prints_the_split_and_one_json_line(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("# Hardware: one 8-GPU node.\n")
    args = ["benchmark", "memory", "--config", str(cfg), "--task", "pretrain", *TINY]
    assert main([*args, "train.batch_size=64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    row = json.loads(lines[-1])
    assert row["gpus"] == 8 and row["batch_per_gpu"] == 8 and row["fits"] is True
    assert "parameters" in lines[-2] and "activations" in lines[-2]
    assert main([*args, "train.batch_size=64", "--gpu-memory", "0.0001"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["fits"] is False


def test_memory_command_names_what_it_cannot_plan(capsys):
    assert main(["benchmark", "memory"]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["benchmark", "memory", "--config", str(REPO / "README.md")]) == 2


@pytest.mark.slow
def test_detection_plans_with_the_worst_case_of_its_data_dependent_steps(capsys):
    """NMS, box sampling and the foreground masks depend on the data: planned at their worst
    case and said so; the evaluation forward (test-time NMS) plans too."""
    args = ["benchmark", "memory", "--config", str(REPO / "configs/det/overfit_coco128.yaml"),
            "model.img_size=64", "train.batch_size=1", "model.roi_batch_size=16"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    row = json.loads(out[-1])
    assert row["fits"] and row["eval_gib"] > 0 and row["train_gib"] > row["parameters_gib"]
    assert "worst case taken for" in out[-2] and "nms" in out[-2]
