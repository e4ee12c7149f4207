"""crossmae benchmark at a tiny size on CPU, and the FLOP counts that MFU is computed from."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import crossmae
from crossmae.cli import main


def run_tool(*args: str) -> list[dict]:
    """``crossmae benchmark ARGS`` (in this process): its JSON lines."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["benchmark", *args]) == 0
    return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


def tool_error(*args: str) -> str:
    """What ``crossmae benchmark ARGS`` says when it refuses them (status 2)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["benchmark", *args])
        except SystemExit as e:  # argparse
            code = e.code
    assert code == 2, err.getvalue()
    return err.getvalue()


def test_step_benchmark_runs_on_cpu_at_tiny_size():
    rows = run_tool("step", "--tiny", "--batch", "4", "--steps", "2", "--warmup", "1",
                    "--modes", "eager", "--pred-ratios", "0.25", "--sdpa", "math")  # fmt: skip
    assert [(r["model"], r["pred_ratio"]) for r in rows] == [
        ("crossmae_vit_base_patch16", 0.25), ("mae_vit_base_patch16", None)
    ]  # fmt: skip
    for r in rows:
        assert r["img_per_s"] > 0 and r["gflop_per_img"] > 0 and r["device"] == "cpu"
        assert r["sdpa"] == "math" and r["input"] == "uint8"  # as pretraining feeds the step
    # CrossMAE at γ = 0.25 does less work than MAE decoding every patch
    assert rows[0]["gflop_per_img"] < rows[1]["gflop_per_img"]


@pytest.mark.slow
def test_step_benchmark_takes_inductor_settings_and_names_a_wrong_one():
    rows = run_tool("step", "--tiny", "--batch", "4", "--steps", "1", "--warmup", "1",
                    "--modes", "compiled", "--models", "crossmae_vit_base_patch16",
                    "--pred-ratios", "0.25",
                    "--inductor", "triton.mix_order_reduction_split_size=64",
                    "--memory-budget", "0.8")  # fmt: skip
    assert rows[0]["inductor"] == {"triton.mix_order_reduction_split_size": 64}
    assert rows[0]["memory_budget"] == 0.8
    err = tool_error("step", "--tiny", "--inductor", "triton.no_such_setting=1")
    assert "triton.no_such_setting does not exist" in err


@pytest.mark.slow
def test_saved_lists_what_the_compiled_step_keeps_and_a_budget_shrinks_it():
    """At a lower activation memory budget the partitioner keeps less: the encoder MLP's GELU
    output is recomputed from the fc1 output instead of saved beside it."""
    rows = run_tool("saved", "--tiny", "--batch", "32", "--models", "crossmae_vit_base_patch16",
                    "--pred-ratios", "0.25", "--memory-budget", "1.0", "0.5", "--device", "cpu",
                    "--top", "50")  # fmt: skip
    full, low = rows
    assert (full["memory_budget"], low["memory_budget"]) == (1.0, 0.5)
    assert 0 < low["saved_gib"] < full["saved_gib"]
    assert sum(g["mib"] for g in full["largest"]) == pytest.approx(full["saved_gib"] * 1024)

    def mlp_hidden(row):  # tiny encoder: 32 images x 5 tokens, MLP width 4 x 64
        return sorted(g["producer"] for g in row["largest"] if g["shape"] == [160, 256])

    assert len(mlp_hidden(full)) == 2 and "addmm" in mlp_hidden(full)
    assert mlp_hidden(low) == ["addmm"]
    for bad, message in (
        (["--memory-budget", "1.5"], "a memory budget is in [0, 1], got 1.5"),
        (["--sdpa", "efficient", "--device", "cpu"], "is a CUDA kernel"),
    ):
        assert message in tool_error("saved", "--tiny", *bad)


def test_attention_benchmark_times_each_backend_on_cpu():
    rows = run_tool("attention", "--batch", "2", "--iters", "1", "--warmup", "1")
    timed = [r for r in rows if "fwd_bwd_ms" in r]
    assert {(r["shape"], r["sdpa"]) for r in timed} >= {
        (s, b) for s in ("encoder self-attention", "MAE decoder self-attention")
        for b in ("auto", "math")
    }  # fmt: skip
    assert all(r["fwd_bwd_ms"] > 0 for r in timed)
    fastest = rows[-1]["fastest"]
    assert fastest["CrossMAE decoder cross-attention"] in {r["sdpa"] for r in timed}


def test_data_benchmark_runs(shared_dir):
    rows = run_tool("data", "--folder", str(shared_dir / "data" / "imagenette" / "train"),
                    "--images", "20", "--no-gpu")  # fmt: skip
    assert [r["pipeline"].split(", ")[-1] for r in rows] == ["uint8", "normalised fp32"]
    assert all(r["images"] == 20 and r["img_per_s_per_worker"] > 0 for r in rows)


@pytest.mark.parametrize(
    "name, pred_ratio, gflop",
    [("crossmae_vit_base_patch16", 0.25, 38.2), ("crossmae_vit_base_patch16", 0.75, 56.9),
     ("mae_vit_base_patch16", None, 56.3)],
)  # fmt: skip
@pytest.mark.slow
def test_training_flops_match_the_reference(name, pred_ratio, gflop):
    """docs/reference.md: forward + backward per 224^2 image, counted with torch.utils.flop_counter.
    The official encoder embeds all 196 patches and drops 147; ours embeds the 49 it keeps, so
    ours is the reference less that convolution's forward and weight-gradient work."""
    model = crossmae.create_model(
        name, **({} if pred_ratio is None else {"pred_ratio": pred_ratio})
    )
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224))["loss"].backward()
    dropped = 196 - 49
    embed_flops = 2 * 768 * (3 * 16 * 16)  # one patch through the 16x16 convolution, forward
    expected = gflop - dropped * embed_flops * 2 / 1e9  # forward + weight gradient
    assert counter.get_total_flops() / 1e9 == pytest.approx(expected, abs=0.05)


@pytest.mark.slow
def test_transfer_task_steps_are_timed_on_the_engine():
    """ViTDet, UperNet and finetuning steps (each recipe's precision) and their evaluation
    throughput, at a tiny size on CPU: one row each with speed and FLOPs."""
    rows = run_tool("tasks", "--tiny", "--steps", "1", "--warmup", "1")
    assert [(r["task"], r["precision"]) for r in rows] == [
        ("det", "fp16"), ("finetune", "bf16"), ("seg", "fp16")
    ]  # fmt: skip
    for r in rows:
        assert r["img_per_s"] > 0 and r["eval_img_per_s"] > 0 and r["gflop_per_img"] > 0


def test_the_command_line_names_the_attention_backends_the_models_have():
    from crossmae.commands.benchmark import SDPA_NAMES
    from crossmae.models.layers import SDPA_BACKENDS

    assert tuple(SDPA_BACKENDS) == SDPA_NAMES
