"""The task interface from the outside: a task defined in tests/pixel_task.py (no product file
names it) runs through ``run_task`` with resume, and once its package is installed (an entry
point), the command line, ``benchmark tasks`` and the transfer stage list pick it up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_encoder_export

from crossmae.config import load_config
from crossmae.runner import run_task

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    tiny_encoder_export(path, embed_dim=32, depth=2, num_heads=2)
    return path


def pixel_run(out: Path, encoder: Path, *settings: str, resume: str | None = None) -> dict:
    from pixel_task import PixelTask

    settings = [f"encoder.checkpoint={encoder}", f"output_dir={out}", *settings]
    cfg = load_config(PixelTask.schema, [], settings, complete=True)
    return run_task(PixelTask(cfg), cfg, resume)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_new_task_runs_through_the_runner_and_resumes_exactly(tmp_path, encoder):
    from crossmae.checkpoint import LAST, load_checkpoint

    whole = pixel_run(tmp_path / "a", encoder)
    assert whole["step"] == 4 and not whole["interrupted"] and whole["metrics"]["mse"] > 0
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "results.json", LAST):
        assert (tmp_path / "a" / name).is_file(), name
    ck = load_checkpoint(tmp_path / "a" / LAST, expect="test-pixel-v1")
    assert ck["task"] == "pixel" and ck["hooks"]["evaluation"]["evaluated_at"] == 4
    # stopped after 2 steps (the schedule unchanged), then continued: the same losses
    assert pixel_run(tmp_path / "b", encoder, "train.max_steps=2")["step"] == 2
    resumed = pixel_run(tmp_path / "b", encoder, resume="auto")
    assert resumed["step"] == 4 and losses(tmp_path / "b") == losses(tmp_path / "a")
    assert resumed["metrics"] == whole["metrics"]
    with pytest.raises(ValueError, match="is a 'test-pixel-v1' checkpoint, not"):
        load_checkpoint(tmp_path / "a" / LAST, expect="crossmae-pretrain-v1")


def installed(tmp_path: Path) -> dict:
    """The environment of a process in which tests/pixel_task.py is an installed plugin: a
    distribution's metadata declaring its ``crossmae.plugins`` entry point."""
    dist = tmp_path / "crossmae_pixel-0.1.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: crossmae-pixel\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[crossmae.plugins]\npixel = pixel_task\n")
    path = os.pathsep.join([str(tmp_path), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


CHECKS = """
import json, sys
from crossmae.cli import main
from crossmae.bench import bench_cases
from crossmae.task import transfer_stages
print(json.dumps({"stages": [t.transfer.name for t in transfer_stages()],
                  "benchmarked": list(bench_cases())}))
sys.exit(main(sys.argv[1:]))
"""


def crossmae(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``crossmae ARGS`` in a new process, which first prints the stage list and the benchmarked
    tasks as its registries hold them."""
    return subprocess.run([sys.executable, "-c", CHECKS, *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO)  # fmt: skip


@pytest.mark.slow
def test_an_installed_task_is_found_by_the_cli_the_benchmark_and_the_transfer_stages(tmp_path):
    before = crossmae("transfer", "--list")
    assert before.returncode == 0, before.stderr
    stages = json.loads(before.stdout.splitlines()[0])["stages"]
    assert stages == ["frozen", "linprobe", "finetune", "det", "seg"]
    bench = crossmae("benchmark", "tasks", "--tiny", "--tasks", "pixel", "--steps", "1",
                     "--warmup", "0", "--device", "cpu", env=installed(tmp_path))  # fmt: skip
    assert bench.returncode == 0, bench.stderr
    found = json.loads(bench.stdout.splitlines()[0])
    assert found["stages"][-1] == "pixel" and "pixel" in found["benchmarked"]
    rec = json.loads(bench.stdout.strip().splitlines()[-1])
    assert rec["task"] == "pixel" and rec["img_per_s"] > 0 and rec["gflop_per_img"] > 0
    help_ = crossmae("pixel", "train", "--help", env=installed(tmp_path))
    assert help_.returncode == 0 and "Required: encoder.checkpoint, output_dir" in " ".join(
        help_.stdout.split()
    )


PLUGINS = {
    "clash": "from cls.task import FrozenTask\nfrom crossmae.task import register_task\n\n"
    "@register_task\nclass Mine(FrozenTask):\n    name = 'mine'\n",
    "stage": "import dataclasses\nfrom cls.task import FrozenTask\n"
    "from crossmae.task import register_task\n\n@register_task\n"
    "class Other(FrozenTask):\n    name, command = 'other', ('other', 'run')\n"
    "    transfer = dataclasses.replace(FrozenTask.transfer, order=7)\n",
    "syntax": "def broken(:\n",
    "missing": "import crossmae_no_such_module\n",
    "boom": "raise RuntimeError('boom at import')\n",
}


@pytest.mark.slow
def test_a_plugin_cannot_replace_a_built_in_and_a_broken_one_breaks_nothing_else(tmp_path):
    """A plugin task with a built-in's command (cls frozen) or transfer stage name (frozen) is
    refused with one line naming both; a plugin with a syntax error, a missing module or an
    exception at import is one line naming it; --help, the built-in commands and the stage list
    work as without them."""
    for name, text in PLUGINS.items():
        (tmp_path / f"plugin_{name}.py").write_text(text)
    dist = tmp_path / "crossmae_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: crossmae-broken\nVersion: 0.1\n")
    points = "".join(f"{n} = plugin_{n}\n" for n in PLUGINS)
    (dist / "entry_points.txt").write_text(f"[crossmae.plugins]\n{points}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(tmp_path), str(TESTS), os.environ.get("PYTHONPATH", "")]
        ),
    }
    help_ = subprocess.run([sys.executable, "-m", "crossmae", "--help"], capture_output=True,
                           text=True, timeout=300, env=env, cwd=REPO)  # fmt: skip
    assert help_.returncode == 0 and "pretrain" in help_.stdout, help_.stderr
    lines = [line for line in help_.stderr.splitlines() if "was not loaded" in line]
    assert len(lines) == len(PLUGINS), help_.stderr
    why = {n: next(line for line in lines if f"plugin {n!r}" in line) for n in PLUGINS}
    assert "the command 'cls frozen' of cls.task.FrozenTask" in why["clash"]
    assert "plugin_clash.Mine" in why["clash"]
    assert "the transfer stage 'frozen'" in why["stage"]
    assert "SyntaxError" in why["syntax"] and "ModuleNotFoundError" in why["missing"]
    assert "RuntimeError: boom at import" in why["boom"]
    assert "Traceback" not in help_.stderr
    listed = crossmae("transfer", "--list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout.splitlines()[0])["stages"] == [
        "frozen", "linprobe", "finetune", "det", "seg"]  # fmt: skip
    frozen = subprocess.run(
        [sys.executable, "-m", "crossmae", "cls", "frozen", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert frozen.returncode == 0 and "kNN" in frozen.stdout


def test_ablate_finds_its_encoder_evaluation_by_role_not_by_name(monkeypatch):
    """``crossmae ablate`` scores encoders with the one transfer stage that declares
    ``scores_encoders`` (cls frozen), whatever its name; none or two is a clear error."""
    from dataclasses import replace

    import crossmae.task as task_module
    from crossmae.task import encoder_scorer, get_task

    frozen = get_task("frozen")
    assert encoder_scorer() is frozen
    settings = frozen.transfer.scores_encoders.settings(Path("e.pt"), "tr", "va", 32, 0)
    cfg = load_config(frozen.schema, [], settings)  # every setting is one of its schema
    assert (cfg.encoder.checkpoint, cfg.data.train, cfg.data.val) == ("e.pt", "tr", "va")
    assert frozen.transfer.scores_encoders.scores({"knn_top1": 1.0, "linprobe_top1": 2.0}) == {
        "knn_top1": 1.0, "probe_top1": 2.0}  # fmt: skip
    renamed = type(
        "Renamed",
        (frozen,),
        {"name": "renamed", "transfer": replace(frozen.transfer, name="renamed")},
    )
    monkeypatch.setitem(task_module._TASKS, "frozen", renamed)
    assert encoder_scorer() is renamed
    monkeypatch.setitem(task_module._TASKS, "second", frozen)
    with pytest.raises(RuntimeError, match="exactly one .* found renamed, frozen$"):
        encoder_scorer()
    monkeypatch.setitem(task_module._TASKS, "frozen", get_task("seg"))
    monkeypatch.delitem(task_module._TASKS, "second")
    with pytest.raises(RuntimeError, match="found none"):
        encoder_scorer()
