"""Transfer curves (``tools/transfer.sh --curve``): a run keeps its encoder every N epochs and at
its last, every kept checkpoint is evaluated once (the evaluated ones skipped on the next call),
``--watch`` follows a run until its final checkpoint is evaluated."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from crossmae.cli import main
from crossmae.commands import curve


def tiny_run(out, *settings):
    """A pretraining run of the default (laptop) CrossMAE on the built-in photos, 2 steps per
    epoch."""
    from crossmae.config import load_config
    from crossmae.pretrain import PretrainConfig, pretrain

    return pretrain(load_config(PretrainConfig, [], [
        f"output_dir={out}", "train.batch_size=8", "data.demo_samples_per_epoch=16",
        "log.vis_every_epochs=0", "log.tensorboard=false", "log.progress=false",
        "data.num_workers=0", *settings]))  # fmt: skip


@pytest.mark.slow
def test_kept_encoders_every_n_epochs_and_at_the_last(tmp_path):
    tiny_run(tmp_path, "train.epochs=3", "log.keep_every_epochs=2")
    kept = curve.kept_checkpoints(tmp_path)
    assert list(kept) == [2, 3]  # every 2 epochs, and the run's last
    assert not list(tmp_path.glob("checkpoint-epoch*.pt"))
    last = torch.load(kept[3], weights_only=False)
    final = torch.load(tmp_path / "encoder.pt", weights_only=False)
    assert last["epoch"] == 3 and last["step"] == 6 and "optimizer" not in last
    assert all(torch.equal(last["encoder"][k], v) for k, v in final["encoder"].items())
    two = torch.load(kept[2], weights_only=False)
    assert two["step"] == 4 and two["epoch"] == 2
    assert not all(torch.equal(two["encoder"][k], v) for k, v in last["encoder"].items())
    assert curve.run_state(tmp_path) == "done"


def test_kept_checkpoints_reads_older_runs_and_prefers_the_encoder(tmp_path):
    for name in ("checkpoint-epoch5.pt", "checkpoint-epoch10.pt", "encoder-epoch10.pt",
                 "encoder-epochs.pt", "checkpoint-last.pt"):  # fmt: skip
        (tmp_path / name).write_bytes(b"x")
    kept = curve.kept_checkpoints(tmp_path)
    assert {e: p.name for e, p in kept.items()} == {5: "checkpoint-epoch5.pt",
                                                    10: "encoder-epoch10.pt"}  # fmt: skip
    assert curve.run_state(tmp_path) == "running"
    (tmp_path / "results.json").write_text(json.dumps({"interrupted": True}))
    assert curve.run_state(tmp_path) == "stopped"


@pytest.mark.slow
def test_curve_over_three_checkpoints_skips_evaluated_ones_and_watches(
    shared_dir, tmp_path, monkeypatch, capsys
):
    run, out = tmp_path / "run", tmp_path / "curve"
    tiny_run(run, "train.epochs=3", "log.keep_every_epochs=1")
    monkeypatch.setenv("CROSSMAE_SHARED", str(shared_dir))
    assert main(["transfer", "--curve", "--smoke", str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"== epoch {e}: {run}/encoder-epoch{e}.pt" in printed for e in (1, 2, 3))
    # epoch 0 first: the same architecture untrained, the control the curve is read against
    assert "== epoch 0: the untrained encoder of encoder-epoch1.pt's architecture" in printed
    table = json.loads((out / "curve.json").read_text())
    assert [p["epoch"] for p in table["points"]] == [0, 1, 2, 3]
    control = json.loads((out / "epoch0" / "frozen" / "results.json").read_text())["metrics"]
    assert control["weights"] == "random init"
    assert list(table["metrics"]) == ["knn_top1", "fast_probe_top1"]
    for point in table["points"]:
        assert point["stages"] == {"frozen": "done"}
        assert all(0.0 <= v <= 100.0 for v in point["metrics"].values())
        result = json.loads(
            (out / f"epoch{point['epoch']}" / "frozen" / "results.json").read_text()
        )
        assert result["metrics"]["knn_top1"] == point["metrics"]["knn_top1"]
        assert result["metrics"]["checkpoint"] == point["checkpoint"]
    md = (out / "curve.md").read_text()
    assert "| epoch | frozen: kNN top-1 | frozen: fast linear probe top-1 |" in md
    assert md.count("\n| 1 |") + md.count("\n| 2 |") + md.count("\n| 3 |") == 3
    assert md.count("\n| 0 (untrained) |") == 1
    assert (out / "curve.png").stat().st_size > 5000

    # again: nothing is evaluated; a new kept checkpoint alone is
    before = {e: (out / f"epoch{e}" / "frozen" / "results.json").stat().st_mtime for e in (1, 2, 3)}
    shutil.copy(run / "encoder-epoch3.pt", run / "encoder-epoch4.pt")
    assert main(["transfer", "--curve", "--smoke", str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"== epoch {e}: evaluated already" in printed for e in (0, 1, 2, 3))
    assert "== epoch 4: " in printed and "evaluated already" not in printed.split("== epoch 4")[1]
    after = {e: (out / f"epoch{e}" / "frozen" / "results.json").stat().st_mtime for e in (1, 2, 3)}
    assert after == before
    assert [p["epoch"] for p in json.loads((out / "curve.json").read_text())["points"]] == [
        0, 1, 2, 3, 4]  # fmt: skip

    # --watch on a run still going: look, wait, look again until it has finished
    (run / "results.json").rename(run / "results.json.done")
    waits = []

    def sleep(seconds):  # the run keeps epoch 5, then finishes
        waits.append(seconds)
        shutil.copy(run / "encoder-epoch3.pt", run / "encoder-epoch5.pt")
        (run / "results.json.done").rename(run / "results.json")

    monkeypatch.setattr(curve.time, "sleep", sleep)
    argv = ["transfer", "--curve", "--smoke", "--watch", "--poll", "7", str(run), str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert waits == [7] and "the run is running; looking again in 7 s" in printed
    assert "== epoch 5: " in printed
    points = json.loads((out / "curve.json").read_text())["points"]
    assert [p["epoch"] for p in points] == [0, 1, 2, 3, 4, 5]
    assert json.loads((out / "curve.json").read_text())["run_state"] == "done"


def test_curve_errors_name_the_problem(tmp_path, capsys):
    def error(*argv: str) -> str:
        capsys.readouterr()
        assert main(["transfer", *argv]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    (tmp_path / "ckpt.pt").write_bytes(b"x")
    assert "run's folder, not" in error("--curve", str(tmp_path / "ckpt.pt"))
    assert "log.keep_every_epochs=N" in error("--curve", str(tmp_path))
    (tmp_path / "results.json").write_text("{}")  # a finished run that kept none
    assert "log.keep_every_epochs=N" in error("--curve", "--watch", str(tmp_path))
    assert "use it with --curve" in error("--watch", str(tmp_path / "ckpt.pt"))
    assert "write STAGE=FILE" in error("--curve", "--config", "frozen", str(tmp_path))
    assert "det is not among the stages run" in error("--curve", "--config", "det=x.yaml",
                                                      str(tmp_path))  # fmt: skip
    assert "nope.yaml does not exist" in error("--curve", "--config", "frozen=nope.yaml",
                                               str(tmp_path))  # fmt: skip
    out = tmp_path / "out"  # one OUT, one run: another run's curve there is refused at once
    out.mkdir()
    (out / "curve.json").write_text(json.dumps({"run": str(tmp_path / "other-run")}))
    assert "holds the curve of another run" in error("--curve", str(tmp_path), str(out))
    (out / "curve.json").write_text(json.dumps({"run": str(tmp_path / "." / "")}))  # its own
    assert "log.keep_every_epochs=N" in error("--curve", str(tmp_path), str(out))
    (out / "curve.json").write_text("[1, 2]")
    assert "is not a curve this command wrote" in error("--curve", str(tmp_path), str(out))
    with pytest.raises(SystemExit) as e:  # argparse's own check
        main(["transfer", "--curve", "--poll", "0", str(tmp_path)])
    assert e.value.code == 2 and "--poll: must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_a_curve_of_two_models_is_refused_naming_them(tmp_path, capsys):
    """Kept encoders of different models in one folder (a folder reused with another depth or
    patch size) are not drawn as one curve: one line names the epochs of each."""
    tiny_run(tmp_path / "a", "train.epochs=1", "log.keep_every_epochs=1")
    tiny_run(tmp_path / "b", "train.epochs=2", "log.keep_every_epochs=1", "model.patch_size=16")
    shutil.copy(tmp_path / "a" / "encoder-epoch1.pt", tmp_path / "b" / "encoder-epoch1.pt")
    capsys.readouterr()
    assert main(["transfer", "--curve", str(tmp_path / "b"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "kept checkpoints are of 2 different encoders (epochs 1:" in err
    assert "epochs 2:" in err and "one curve is one model" in err


def test_watching_a_run_folder_that_is_deleted_ends_with_one_line(tmp_path, monkeypatch, capsys):
    """--watch on a run whose folder disappears (deleted, moved) ends naming it, instead of
    polling forever and rewriting an empty curve."""
    run = tmp_path / "run"
    run.mkdir()  # a run that has kept nothing yet, still running

    def gone(seconds):
        shutil.rmtree(run)

    monkeypatch.setattr(curve.time, "sleep", gone)
    argv = ["transfer", "--curve", str(run), str(tmp_path / "out"), "--watch", "--poll", "1"]
    assert main(argv) == 2
    assert f"{run} no longer exists" in capsys.readouterr().err
