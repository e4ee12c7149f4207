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


@pytest.mark.slow
def test_accumulation_and_more_gpus_shrink_the_activations_only():
    full = tiny_plan()
    split = tiny_plan("train.micro_batch=8")
    assert (split.micro_batch, split.accumulation) == (8, 4)
    assert split.parts["parameters"] == full.parts["parameters"]
    assert split.parts["activations"] < full.parts["activations"] / 2
    four = tiny_plan(gpus=4)
    assert (four.batch_per_gpu, four.accumulation) == (8, 1)
    assert four.parts["activations"] < full.parts["activations"] / 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_activation_checkpointing_is_chosen_only_when_the_smallest_micro_batch_does_not_fit():
    """train.gpu_memory: the largest micro-batch that fits; activation checkpointing (which
    keeps only each block's input) when no micro-batch fits without it (about 40 s)."""
    from crossmae.config import ConfigError
    from crossmae.memory import fit_micro_batch

    task = get_task("pretrain")
    sized = ["model.img_size=64", "train.batch_size=4"]  # activations above the optimizer's peak
    cfg = load_config(task.schema, [], [*TINY, *sized], complete=True)
    plain = {m: tiny_plan(*sized, f"train.micro_batch={m}") for m in (4, 2, 1)}
    ckpt = tiny_plan(*sized, "train.micro_batch=1", "train.activation_checkpointing=true")
    assert ckpt.parts["activations"] < plain[1].parts["activations"]
    assert ckpt.parts["parameters"] == plain[1].parts["parameters"]
    smallest = min(p.peak_gib for p in plain.values())
    assert ckpt.peak_gib < smallest  # so a budget between them fits only with checkpointing
    micro, checkpointing, why = fit_micro_batch(task, cfg, 1, (ckpt.peak_gib + smallest) / 2)
    assert checkpointing and "with activation checkpointing" in why
    assert f"micro-batch {micro} (" in why or micro == 4
    micro, checkpointing, why = fit_micro_batch(task, cfg, 1, plain[4].peak_gib)
    assert (micro, checkpointing) == (4, False) and why.endswith("no accumulation")
    one = load_config(task.schema, [], [*TINY, "model.img_size=64", "train.batch_size=1"],
                      complete=True)  # fmt: skip
    with pytest.raises(ConfigError, match="even a micro-batch of 1 with activation"):
        fit_micro_batch(task, one, 1, ckpt.peak_gib * 0.5)


def test_a_step_it_cannot_plan_is_one_line_naming_the_operation(monkeypatch, capsys):
    from crossmae.pretrain import PretrainTask

    def losses(self, model, **inputs):  # a size read from the data, not from the config
        first = next(v for v in inputs.values() if torch.is_tensor(v))
        counts = first.flatten()[:4].long()
        return {"loss": torch.repeat_interleave(counts).float().sum()}

    monkeypatch.setattr(PretrainTask, "losses", losses)
    args = ["benchmark", "memory", "--config", str(REPO / "configs/ablate/cifar10_cpu.yaml"),
            *TINY]  # fmt: skip
    assert main(args) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "cannot plan: aten.repeat_interleave" in out[0]


def test_the_planner_touches_no_gpu_when_one_is_present(monkeypatch):
    def no(*args, **kwargs):
        raise AssertionError("the planner touched the GPU")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in ("_lazy_init", "init", "synchronize", "set_device", "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, no)
    assert tiny_plan().peak > 0


# an "80 GB" card: 79 GiB as CUDA reports an H100's, less the CUDA context, cuBLAS's workspace
# and what the caching allocator holds beyond the allocated bytes (about 10 % in our runs)
CARD_80GB_GIB = 72.0


def _plan_row(path):
    from crossmae.commands.memory import gpus_of_config, planned_config, task_of_config

    task = get_task(task_of_config(path))
    plan = plan_memory(task, planned_config(task, path, [], None), gpus_of_config(path))
    return str(path.relative_to(REPO)), plan.gpus, plan.peak_gib


@pytest.mark.slow
def test_every_shipped_multi_gpu_recipe_fits_an_80_gb_card():
    """The planner over every shipped recipe of 8 GPUs or more, at its documented GPU count
    (two processes: the planner runs Python, one core each)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from crossmae.commands.memory import gpus_of_config, shipped_configs

    recipes = [p for p in shipped_configs() if gpus_of_config(p) >= 8]
    assert len(recipes) >= 20  # pretraining, finetune, linear probe, det and seg recipes
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(_plan_row, recipes))
    too_big = [row for row in rows if row[2] > CARD_80GB_GIB]
    assert not too_big, f"planned above {CARD_80GB_GIB} GiB per GPU: {too_big}"


@pytest.mark.parametrize(
    "value, message",
    [("auto", "give the card's memory in GiB"), ("-3", "must be a positive number of GiB"),
     ("lots", "must be a positive number of GiB")],
)  # fmt: skip
def test_gpu_memory_takes_gib_or_auto_on_a_gpu(tmp_path, value, message):
    from crossmae.config import ConfigError
    from crossmae.runner import run_task

    task = get_task("pretrain")
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(task.schema, [], [*TINY, f"train.gpu_memory={value}",
                                            f"output_dir={tmp_path / 'r'}"])  # fmt: skip
        run_task(task(cfg), cfg)
    assert not (tmp_path / "r").exists()
