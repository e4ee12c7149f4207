"""crossmae ablate on two tiny variants, two seeds, a few steps: the table's structure, the
comparisons, and a second call that runs nothing again."""

from __future__ import annotations

import json

import pytest
from test_data import cifar_folder

from crossmae.cli import main

TINY = ["model.img_size=32", "model.patch_size=8", "model.kwargs.embed_dim=32",
        "model.kwargs.depth=2", "model.kwargs.num_heads=2", "model.kwargs.decoder_embed_dim=16",
        "model.kwargs.decoder_num_heads=2", "data.num_workers=0", "train.batch_size=8",
        "train.max_steps=2", "train.precision=fp32", "train.device=cpu", "log.vis_images=2",
        "frozen.probe.epochs=2", "frozen.probe.warmup_epochs=0", "frozen.probe.batch_size=8",
        "frozen.probe.blrs=[0.1,1.0]"]  # fmt: skip


def test_ablate_writes_one_table_and_continues_where_it_stopped(shared_dir, tmp_path, monkeypatch):
    train = cifar_folder(shared_dir, tmp_path / "train", per_class=6, classes=2)
    val = cifar_folder(shared_dir, tmp_path / "val", per_class=3, classes=2)
    out = tmp_path / "out"
    argv = ["ablate", "--train", str(train), "--val", str(val), "--out", str(out), "--variants",
            "mae", "crossmae_g0.25", "--seeds", "2", "--psnr-images", "4", *TINY]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert list(result["table"]) == ["mae", "crossmae_g0.25"]
    for row in result["table"].values():
        assert row["seeds"] == 2
        for m in ("decoder_gmacs", "img_per_s", "final_loss", "psnr", "knn_top1", "probe_top1"):
            assert set(row[m]) == {"mean", "spread"} and row[m]["spread"] >= 0, m
    assert [r["steps"] for r in result["runs"]] == [2, 2, 2, 2]
    # CrossMAE γ = 0.25 decodes a third of MAE's queries with cross-attention only: cheaper
    t = result["table"]
    assert t["crossmae_g0.25"]["decoder_gmacs"]["mean"] < t["mae"]["decoder_gmacs"]["mean"]
    (claim,) = result["comparisons"]
    assert claim["a"] == "crossmae_g0.25" and claim["knn_top1"]["verdict"] in (
        "no difference",
        "a better",
        "b better",
    )
    text = (out / "ablation.md").read_text()
    assert "| crossmae_g0.25 | 2 |" in text and "CrossMAE matches MAE" in text
    assert (out / "ablation.png").stat().st_size > 1000
    # a second call runs nothing again
    import crossmae.runner

    monkeypatch.setattr(crossmae.runner, "run_task", lambda *a, **k: pytest.fail("ran again"))
    assert main(argv) == 0


def test_ablate_names_an_unknown_variant(tmp_path, capsys):
    argv = ["ablate", "--train", "t", "--val", "v", "--out", str(tmp_path), "--variants", "nope"]
    assert main(argv) == 2
    assert "unknown variant(s) ['nope']" in capsys.readouterr().err
