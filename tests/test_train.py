"""The pretraining loop end to end on CPU: run folder, DDP equivalence, exact resume after
SIGKILL, SIGTERM, atomic saves, bad files, non-finite losses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_data import add_bad_files, cifar_folder

import crossmae.pretrain as train_mod
from crossmae.checkpoint import LAST, load_checkpoint, save_atomic
from crossmae.config import ConfigError, load_config
from crossmae.models import VisionTransformer
from crossmae.models.pretrained import model_from_checkpoint
from crossmae.pretrain import PretrainConfig, pretrain

TINY = [
    "model.img_size=32",
    "model.patch_size=8",
    "model.decoder_depth=2",
    "model.kwargs.embed_dim=32",
    "model.kwargs.depth=2",
    "model.kwargs.num_heads=2",
    "model.kwargs.decoder_embed_dim=16",
    "model.kwargs.decoder_num_heads=2",
    "data.num_workers=0",
    "data.demo_samples_per_epoch=64",
    "train.batch_size=16",
    "train.epochs=2",
    "train.precision=fp32",
    "train.device=cpu",
    "log.every_steps=1",
    "log.progress=false",
    "log.tensorboard=false",
    "log.vis_images=2",
    "log.vis_every_epochs=0",  # no figures (about a second each); the tests of them turn them on
]


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]  # the training records


def cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "crossmae", "pretrain", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw,
    )  # fmt: skip


def wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and any(s >= step for s, _ in losses_safe(metrics)):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}:\n{proc.stdout.read()}")
        time.sleep(0.01)
    pytest.fail(f"step {step} not reached in {timeout}s")


def losses_safe(metrics: Path) -> list[tuple[int, float]]:
    out = []
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
            if "loss" in r:  # a training record
                out.append((r["step"], r["loss"]))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


@pytest.mark.slow
def test_run_folder_checkpoint_and_encoder_export(tmp_path):
    run = tmp_path / "run"
    settings = [*TINY, "log.vis_every_epochs=1", f"output_dir={run}"]
    summary = pretrain(load_config(PretrainConfig, [], settings))
    assert summary["step"] == 8 and not summary["interrupted"]
    for f in ("config.yaml", "log.txt", "metrics.jsonl", "loss.png", "results.json", "encoder.pt",
              "recon/epoch-0000.png", "recon/epoch-0001.png", "recon/epoch-0002.png",
              LAST):  # fmt: skip
        assert (run / f).is_file(), f
    assert [s for s, _ in losses(run)] == list(range(1, 9))
    # config.yaml holds what the run used: its folder, γ (= p by default), the precision
    used = OmegaConf.load(run / "config.yaml")
    assert used.output_dir == str(run) and used.model.pred_ratio == 0.75
    assert used.train.precision == "fp32"
    # the log says how long the run is and, at every record, its rate and ETA
    text = (run / "log.txt").read_text()
    assert "steps/epoch, 8 steps, stop at step 8" in text
    assert re.search(r"step 4/8 \(50%\): loss [0-9.]+, lr [0-9.e-]+ \| [0-9.]+ s/step, [0-9.]+ "
                     r"img/s, ETA \d+s", text)  # fmt: skip
    assert re.search(
        r"CPU threads: \d+ per process \(OMP_NUM_THREADS=\S+\), OpenMP waits \w+", text
    )
    # and ends with the run's time and overall speed
    assert re.search(r"done: step 8 \(epoch 2\), \S+ for 8 steps: [0-9.]+ s/step, [0-9.]+ img/s "
                     r"overall; final loss [0-9.]+; ", text)  # fmt: skip
    # every reconstruction figure's masked-patch PSNR, in the records too, the untrained
    # model's (epoch 0, step 0) first
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    psnr = [(r["step"], r["epoch"], r["recon_psnr"]) for r in rows if "recon_psnr" in r]
    assert [(s, e) for s, e, _ in psnr] == [(0, 0), (4, 1), (8, 2)]
    assert all(5 < p < 60 for *_, p in psnr)
    ckpt = load_checkpoint(run / LAST)  # weights_only
    assert ckpt["step"] == 8 and ckpt["mask_ratio"] == 0.75 and ckpt["patch_size"] == 8
    assert ckpt["config"]["model"]["name"] == "crossmae_vit_tiny_patch8" and ckpt["version"]
    model = model_from_checkpoint(ckpt)
    assert model.config["embed_dim"] == 32
    enc = torch.load(run / "encoder.pt", weights_only=True)
    vit = VisionTransformer(**enc["encoder_config"])
    vit.load_state_dict(enc["encoder"], strict=True)
    assert torch.equal(vit.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)
    # a second fresh run into the same folder is refused; --resume auto needs a folder
    with pytest.raises(FileExistsError, match="--resume auto"):
        pretrain(load_config(PretrainConfig, [], [*TINY, f"output_dir={run}"]))
    with pytest.raises(ConfigError, match="output_dir"):
        pretrain(load_config(PretrainConfig, [], TINY), resume="auto")


def test_print_config_shows_the_resolved_settings_and_writes_nothing(tmp_path, capsys,
                                                                     monkeypatch):  # fmt: skip
    from crossmae.cli import main

    monkeypatch.chdir(tmp_path)
    settings = [s for s in TINY if not s.startswith("train.precision")]
    assert main(["pretrain", "--print-config", *settings, "model.mask_ratio=0.6"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.model.pred_ratio == 0.6 and cfg.train.precision == "fp32"  # auto on a CPU
    assert cfg.output_dir.startswith("runs/crossmae_vit_tiny_patch8-")
    assert main(["cls", "finetune", "--print-config", "encoder.checkpoint=x.pt",
                 "data.train=a", "data.val=b"]) == 0  # fmt: skip
    assert OmegaConf.create(capsys.readouterr().out).train.precision == "fp32"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    full = pretrain(load_config(PretrainConfig, [], [*TINY, f"output_dir={tmp_path / 'a'}"]))
    accum = pretrain(
        load_config(
            PretrainConfig, [], [*TINY, "train.micro_batch=4", f"output_dir={tmp_path / 'b'}"]
        )
    )
    a, b = losses(Path(full["output_dir"])), losses(Path(accum["output_dir"]))
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [x for _, x in a] == pytest.approx([x for _, x in b], rel=1e-5)


@pytest.mark.slow
def test_gpu_memory_chooses_the_micro_batch_that_fits_and_trains_the_same_numbers(tmp_path):
    from crossmae.memory import plan_memory
    from crossmae.task import get_task

    def plan(micro):
        return plan_memory(get_task("pretrain"), load_config(PretrainConfig, [], [
            *TINY, f"train.micro_batch={micro}"], complete=True), 1).peak_gib  # fmt: skip

    batch = load_config(PretrainConfig, [], TINY).train.batch_size
    budget = (plan(batch // 2) + plan(batch)) / 2  # the full batch does not fit, half does
    full = pretrain(load_config(PretrainConfig, [], [*TINY, f"output_dir={tmp_path / 'a'}"]))
    fitted = pretrain(load_config(PretrainConfig, [], [
        *TINY, f"train.gpu_memory={budget}", f"output_dir={tmp_path / 'b'}"]))  # fmt: skip
    log = (tmp_path / "b" / "log.txt").read_text()
    assert f"batch {batch} per GPU needs an estimated" in log
    assert f"micro-batch {batch // 2}" in log and "x 2 accumulation" in log
    saved = OmegaConf.load(tmp_path / "b" / "config.yaml")
    assert saved.train.micro_batch == batch // 2 and saved.train.gpu_memory == budget
    a, b = losses(Path(full["output_dir"])), losses(Path(fitted["output_dir"]))
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [x for _, x in a] == pytest.approx([x for _, x in b], rel=1e-5)
    # activation checkpointing, the fallback when no micro-batch fits, trains the same numbers
    ckpt = pretrain(load_config(PretrainConfig, [], [
        *TINY, "train.activation_checkpointing=true", f"output_dir={tmp_path / 'd'}"]))  # fmt: skip
    assert losses(Path(ckpt["output_dir"])) == a
    with pytest.raises(ConfigError, match="even a micro-batch of 1 with activation checkpointing"):
        pretrain(load_config(PretrainConfig, [], [*TINY, "train.gpu_memory=1e-6",
                                                  f"output_dir={tmp_path / 'c'}"]))  # fmt: skip
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    pretrain(load_config(PretrainConfig, [], [*TINY, f"output_dir={tmp_path / 'one'}"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "crossmae", "pretrain", *TINY, f"output_dir={tmp_path / 'two'}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    assert [x for _, x in a] == pytest.approx([x for _, x in b], rel=1e-5)


@pytest.mark.parametrize(
    "setting, message",
    [("train.cuda_graph=true", "cuda_graph=true needs a CUDA device"),
     ("train.sdpa=efficient", "sdpa=efficient is a CUDA kernel"),
     ("train.sdpa=fast", "train.sdpa=fast: must be one of")],
)  # fmt: skip
def test_gpu_only_settings_fail_on_cpu_before_anything_is_written(tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message):
        pretrain(load_config(PretrainConfig, [], [*TINY, setting, f"output_dir={tmp_path}/r"]))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "settings, message",
    [(["train.activation_memory_budget=1.5"], r"activation_memory_budget=1.5: must be at most 1"),
     (["train.activation_memory_budget=0.5"], "applies to the compiled step")],
)  # fmt: skip
def test_a_wrong_memory_budget_fails_before_anything_is_written(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        pretrain(load_config(PretrainConfig, [], [*TINY, *settings, f"output_dir={tmp_path}/r"]))
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_memory_budget_reaches_the_compiled_step(tmp_path, monkeypatch):
    """train.activation_memory_budget is what torch's partitioner reads when the step compiles."""
    import torch._functorch.partitioners as partitioners

    budgets = []
    choose = partitioners.choose_saved_values_set

    def record(*args, memory_budget, **kw):
        budgets.append(memory_budget)
        return choose(*args, memory_budget=memory_budget, **kw)

    monkeypatch.setattr(partitioners, "choose_saved_values_set", record)
    # no cached compilation, in memory or on disk, from an earlier test or run
    torch._dynamo.reset()
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    settings = ["train.compile=true", "train.max_steps=2", "train.activation_memory_budget=0.5",
                "log.vis_every_epochs=0", f"output_dir={tmp_path}/r"]  # fmt: skip
    pretrain(load_config(PretrainConfig, [], [*TINY, *settings]))
    assert budgets and set(budgets) == {0.5}
    assert [s for s, _ in losses(tmp_path / "r")] == [1, 2]


def test_the_loop_feeds_the_model_uint8_pixels(tmp_path, monkeypatch):
    """The CPU-decode pipeline ships uint8 crops; the model normalises them."""
    from crossmae.models.base import MaskedAutoencoderBase

    seen = []
    to_input = MaskedAutoencoderBase.pixels_to_input

    def record(self, imgs):
        seen.append(imgs.dtype)
        return to_input(self, imgs)

    monkeypatch.setattr(MaskedAutoencoderBase, "pixels_to_input", record)
    settings = ["train.max_steps=1", "log.vis_every_epochs=0", f"output_dir={tmp_path}/r"]
    pretrain(load_config(PretrainConfig, [], [*TINY, *settings]))
    assert seen[0] == torch.uint8  # the training step (the final reconstructions: floats)


@pytest.mark.gpu
def test_cuda_graph_run_matches_the_plain_run(tmp_path, monkeypatch):
    """train.cuda_graph replays forward + backward: the same losses as the plain loop (fp32).
    Self-contained for the device image: JPEGs written here, no plots (matplotlib may be absent)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for i in range(96):
        img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "data" / f"{i}.jpg")
    monkeypatch.setattr(train_mod, "save_loss_curve", lambda *a, **k: None)
    base = [*TINY, "train.device=cuda", "train.epochs=1", f"data.path={tmp_path / 'data'}",
            "log.vis_every_epochs=0"]  # fmt: skip
    runs = {}
    for graph in ("false", "true"):
        out = tmp_path / graph
        pretrain(load_config(PretrainConfig, [], [*base, f"train.cuda_graph={graph}",
                                                  f"output_dir={out}"]))  # fmt: skip
        runs[graph] = losses(out)
    assert [s for s, _ in runs["true"]] == list(range(1, 7))
    assert [x for _, x in runs["true"]] == pytest.approx([x for _, x in runs["false"]], rel=1e-4)


LONG = [*TINY, "data.demo_samples_per_epoch=640", "train.epochs=1"]  # 40 steps in one epoch


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
    pretrain(load_config(PretrainConfig, [], [*LONG, f"output_dir={tmp_path / 'ref'}"]))

    run = tmp_path / "run"
    proc = cli(*LONG, "log.ckpt_every_steps=1", f"output_dir={run}")
    wait_for_step(run, proc, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(run / LAST)["step"]
    assert 0 < killed_at < 40  # mid-epoch

    cfg = load_config(PretrainConfig, [], [*LONG, "log.ckpt_every_steps=1", f"output_dir={run}"])
    assert pretrain(cfg, resume="auto")["step"] == 40
    assert f"resumed from {run / LAST} at step {killed_at}" in (run / "log.txt").read_text()
    assert losses(run) == losses(tmp_path / "ref")  # bit for bit


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])  # fmt: skip
def test_a_stop_signal_to_the_process_group_leaves_a_usable_checkpoint(tmp_path, sig):
    """SIGTERM (timeout, Slurm, submitit), Ctrl-C and SIGHUP (a closed terminal, an ssh drop)
    alike, sent to the whole process group as
    they are, data workers included: the workers leave it to the main process, which finishes
    its step, writes the checkpoint and encoder.pt, and exits 1 without a traceback; --resume
    auto completes the run."""
    run = tmp_path / "run"
    proc = cli(
        *LONG,
        "data.num_workers=2",
        f"output_dir={run}",
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )  # not nohup's
    wait_for_step(run, proc, 3)
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert f"signal {sig.name}: checkpoint written" in out and "--resume auto" in out
    assert "Traceback" not in out and not (run / "run.lock").exists()
    ckpt = load_checkpoint(run / LAST)
    assert 3 <= ckpt["step"] < 40 and json.loads((run / "results.json").read_text())["interrupted"]
    model_from_checkpoint(ckpt)
    assert torch.load(run / "encoder.pt", weights_only=True)["step"] == ckpt["step"]
    cfg = load_config(PretrainConfig, [], [*LONG, "data.num_workers=2", f"output_dir={run}"])
    assert pretrain(cfg, resume="auto")["step"] == 40
    assert [s for s, _ in losses(run)] == list(range(1, 41))


def test_a_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / LAST
    save_atomic({"format": "x", "step": 1, "w": torch.ones(3)}, path)

    def torn_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"format": "x", "step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]  # no temporary file left


def test_bad_files_are_skipped_counted_and_reported(shared_dir, tmp_path):
    root = cifar_folder(shared_dir, tmp_path / "data", per_class=10, classes=2)
    add_bad_files(root / "airplane", next((root / "airplane").iterdir()))
    overrides = [f"data.path={root}", f"output_dir={tmp_path / 'run'}", "train.batch_size=8"]
    cfg = load_config(PretrainConfig, [], [*TINY, *overrides])
    summary = pretrain(cfg)
    assert summary["step"] == 2 * (23 // 8) and summary["skipped_files"] == 3
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {Path(s.split(" (")[0]).name for s in report["skipped"]} == {
        "corrupt.jpg",
        "truncated.jpg",
        "fake.png",
    }


class NanAfter(torch.nn.Module):
    """Wraps a model; its loss is NaN on the training calls listed (1 = the first training step;
    forwards in eval mode, such as the reconstruction figures', are not counted)."""

    def __init__(self, model, nan_calls):
        super().__init__()
        self.model, self.nan_calls, self.calls = model, set(nan_calls), 0
        self.config, self.mask_sampler = model.config, model.mask_sampler
        self.mask_ratio, self.pred_ratio = model.mask_ratio, model.pred_ratio
        self.patch_size, self.grid_size = model.patch_size, model.grid_size
        self.norm_pix_loss, self.encoder = model.norm_pix_loss, model.encoder

    def mask_counts(self, *a):
        return self.model.mask_counts(*a)

    def forward(self, imgs, **kw):
        out = self.model(imgs, **kw)
        self.calls += self.training
        if self.training and self.calls in self.nan_calls:
            out["loss_recon"] = out["loss_recon"] * float("nan")
        return out


@pytest.mark.slow
def test_nonfinite_losses_skip_the_step_then_stop_the_run(tmp_path, monkeypatch):
    build = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda m: NanAfter(build(m), {2}))
    summary = pretrain(load_config(PretrainConfig, [], [*TINY, f"output_dir={tmp_path / 'a'}"]))
    assert summary["step"] == 8 and summary["final_loss"] == summary["final_loss"]  # finite
    monkeypatch.setattr(train_mod, "build_model", lambda m: NanAfter(build(m), range(3, 100)))
    cfg = load_config(PretrainConfig, [], [*TINY, f"output_dir={tmp_path / 'b'}",
                                           "train.max_nonfinite_steps=3"])  # fmt: skip
    with pytest.raises(FloatingPointError, match="non-finite for 3 steps in a row"):
        pretrain(cfg)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_clipping_run(tmp_path, precision):
    overrides = [f"train.precision={precision}", "train.max_steps=3", "optim.clip_grad=1.0"]
    cfg = load_config(PretrainConfig, [], [*TINY, *overrides, f"output_dir={tmp_path}"])
    summary = pretrain(cfg)
    assert summary["step"] == 3 and summary["final_loss"] == summary["final_loss"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert all("grad_norm" in r for r in rows if "loss" in r)


@pytest.mark.slow
def test_device_decode_pipeline_trains(shared_dir, tmp_path):
    root = cifar_folder(shared_dir, tmp_path / "data", per_class=16, classes=1)
    overrides = [f"data.path={root}", "data.gpu_decode=true", "train.max_steps=2"]
    summary = pretrain(
        load_config(PretrainConfig, [], [*TINY, *overrides, f"output_dir={tmp_path / 'r'}"])
    )
    assert summary["step"] == 2 and summary["final_loss"] == summary["final_loss"]


@pytest.mark.slow
def test_knn_monitor_during_pretraining(shared_dir, tmp_path):
    train = cifar_folder(shared_dir, tmp_path / "knn_train", per_class=6, classes=2)
    val = cifar_folder(shared_dir, tmp_path / "knn_val", per_class=3, classes=2)
    overrides = [f"data.knn_train={train}", f"data.knn_val={val}", "log.knn_every_epochs=1",
                 "log.vis_every_epochs=1"]  # fmt: skip
    pretrain(load_config(PretrainConfig, [], [*TINY, *overrides, f"output_dir={tmp_path / 'r'}"]))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    knn = [r for r in rows if "knn_top1" in r]
    assert [r["epoch"] for r in knn] == [1, 2] and all(0 <= r["knn_top1"] <= 100 for r in knn)
    assert (tmp_path / "r" / "loss.png").is_file()
    with pytest.raises(ConfigError, match="knn_train"):
        pretrain(load_config(PretrainConfig, [], [*TINY, "log.knn_every_epochs=1"]))


def test_engine_checkpoints_restore_every_random_stream(tmp_path):
    """The checkpoint hook's file holds every process's streams (torch CPU, each CUDA device,
    numpy, Python) and ``Engine.load_state_dict`` puts them back as they were saved."""
    import random

    import numpy as np
    from conftest import check_random_states

    from crossmae.engine import Engine
    from crossmae.hooks import CheckpointHook

    def engine() -> tuple[Engine, CheckpointHook]:
        model = torch.nn.Linear(2, 2)
        saver = CheckpointHook(tmp_path, lambda: {"format": "test"})
        e = Engine(model, torch.optim.AdamW(model.parameters()), None, lambda s: 1e-3, None,
                   steps=8, device=torch.device("cpu"), hooks=[saver])  # fmt: skip
        return e, saver

    saving, saver = engine()
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    saving.step = 4
    saver.save(saving)
    check_random_states(tmp_path / LAST)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)  # elsewhere now
    resumed, _ = engine()
    resumed.load_state_dict(load_checkpoint(tmp_path / LAST), what="test")
    assert resumed.step == 4
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


class Regression:
    """What an engine step computes in the tests below: a squared error on (x, y) batches."""

    def __init__(self, device: str):
        self.device = device

    def inputs(self, batch, device):
        return {"x": batch[0].to(device), "y": batch[1].to(device)}

    def losses(self, model, x, y):
        return {"loss": ((model(x) - y) ** 2).mean()}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_engine_resume_repeats_the_uninterrupted_run(tmp_path, device):
    """Stop after 2 steps, resume in a fresh engine (as a new process would: seeded again, the
    model rebuilt): steps 3 and 4 give the uninterrupted run's losses, dropout included, which
    draws from the device's generator (CUDA's on a GPU)."""
    from torch.utils.data import Dataset, default_collate

    from crossmae.data import ResumableSampler, make_loader
    from crossmae.engine import Engine
    from crossmae.hooks import CheckpointHook, MetricsWriter

    class Keyed(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)

        def __len__(self):
            return 16

        def __getitem__(self, key):
            return self.x[key[0]], self.y[key[0]]

    def run(out, steps: int) -> dict[int, float]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.5),
                                    torch.nn.Linear(32, 1)).to(device)  # fmt: skip
        sampler = ResumableSampler(16, per_rank_step=4, seed=0)
        writer = MetricsWriter(out, images_per_step=4, every_steps=1)
        saver = CheckpointHook(out, lambda: {"format": "test"})
        engine = Engine(
            model, torch.optim.AdamW(model.parameters()),
            make_loader(Keyed(), sampler, 4, 0, False, default_collate), lambda s: 1e-2,
            Regression(device), steps=steps, device=torch.device(device), hooks=[writer, saver],
        )  # fmt: skip
        if (out / LAST).is_file():
            engine.load_state_dict(load_checkpoint(out / LAST), what="test")
        engine.train()
        saver.save_if_stale(engine)
        writer.close()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
        return {r["step"]: r["loss"] for r in rows}

    whole = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed == pytest.approx(whole, rel=1e-6)
    assert whole[3] != whole[4]  # the steps differ: dropout and data move on
    # a loader drawing its worker seeds from the global stream would break this: refused
    from torch.utils.data import DataLoader

    with pytest.raises(ValueError, match="its own generator"):
        Engine(torch.nn.Linear(1, 1), None, DataLoader(Keyed()), float, Regression("cpu"),
               steps=1, device=torch.device("cpu"))  # fmt: skip


@pytest.mark.slow
def test_a_checkpoint_that_left_gamma_open_resumes(tmp_path):
    """Checkpoints of earlier versions hold ``pred_ratio: null`` (γ = p decided at run time):
    resuming compares them with the same default decided, so nothing looks changed."""
    run = tmp_path / "run"
    pretrain(load_config(PretrainConfig, [], [*TINY, f"output_dir={run}", "train.max_steps=2"]))
    ckpt = torch.load(run / LAST, weights_only=True)
    assert ckpt["config"]["model"]["pred_ratio"] == 0.75
    ckpt["config"]["model"]["pred_ratio"] = None
    torch.save(ckpt, run / LAST)
    done = pretrain(load_config(PretrainConfig, [], [*TINY, f"output_dir={run}"]), resume="auto")
    assert done["step"] == 8


@pytest.mark.slow
def test_the_online_probe_logs_top1_and_leaves_the_encoder_bit_identical(shared_dir, tmp_path):
    """solo-learn's online linear evaluation: a head on the stop-gradient cls token learns
    alongside pretraining; its held-out top-1 is logged every epoch, and the encoder ends
    bit-identical to a run without it."""
    from test_data import cifar_folder

    train = cifar_folder(shared_dir, tmp_path / "train", per_class=12, classes=3)
    val = cifar_folder(shared_dir, tmp_path / "val", per_class=4, classes=3)
    # drop path draws from the run's random stream: the probe must not move it
    common = [s for s in TINY if not s.startswith("data.demo")] + [
        f"data.path={train}",
        "model.drop_path_rate=0.2",
    ]
    plain = pretrain(load_config(PretrainConfig, [], [*common, f"output_dir={tmp_path / 'a'}"]))
    probed = pretrain(load_config(PretrainConfig, [], [
        *common, f"output_dir={tmp_path / 'b'}", f"probe.val={val}"]))  # fmt: skip
    a = load_checkpoint(tmp_path / "a" / LAST)["model"]
    b = load_checkpoint(tmp_path / "b" / LAST)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    assert losses(tmp_path / "a") == [(r["step"], r["loss"]) for r in rows if "loss" in r]
    probe = [r for r in rows if "online_probe_top1" in r]
    assert [r["epoch"] for r in probe] == [1, 2]
    assert all(0.0 <= r["online_probe_top1"] <= 100.0 for r in probe)
    assert probed["online_probe"]["top1"] == probe[-1]["online_probe_top1"]
    assert "online_probe" not in plain or plain["online_probe"] is None
    ck = load_checkpoint(tmp_path / "b" / LAST)
    assert "head" in ck["hooks"]["online_probe"]
    # a flat folder has no labels to learn
    with pytest.raises(ConfigError, match="class folders"):
        pretrain(load_config(PretrainConfig, [], [
            *TINY, f"output_dir={tmp_path / 'c'}", f"data.path={train / 'airplane'}",
            f"probe.val={val}"]))  # fmt: skip


def test_a_model_setting_given_twice_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="model.kwargs.drop_path_rate: .* model.drop_path_rate"):
        pretrain(load_config(PretrainConfig, [], [*TINY, f"output_dir={tmp_path / 'run'}",
                                                  "model.kwargs.drop_path_rate=0.1"]))  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("given, used", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_while_waiting_unless_told(given, used):
    """Importing crossmae (before torch) makes OpenMP wait passively unless the environment
    says otherwise: spinning threads slowed a CPU step 4.5x beside one busy process."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update({"OMP_WAIT_POLICY": given} if given else {})
    code = "import os, crossmae; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    assert out.strip() == used
