"""The submitit launcher, run through submitit's local executor with 2 CPU tasks (gloo)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO
from test_train import TINY

from crossmae.checkpoint import LAST, load_checkpoint


@pytest.mark.slow
def test_submitit_local_two_tasks(tmp_path):
    run = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "submit.py"), "--cluster", "local",
         "--gpus-per-node", "0", "--tasks-per-node", "2", "--timeout-min", "10", "--wait",
         *TINY, "train.epochs=1", f"output_dir={run}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    logs = "\n".join(p.read_text() for p in (run / "slurm").glob("*.err")) if run.exists() else ""
    assert res.returncode == 0, res.stdout + res.stderr + logs
    assert "exit codes [0, 0]" in res.stdout
    ckpt = load_checkpoint(run / LAST)
    assert ckpt["step"] == 4 and ckpt["config"]["train"]["batch_size"] == 16
