"""crossmae ablate on two tiny variants, two seeds, a few steps: the table's structure, the
comparisons, and a second call that runs nothing again."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO
from test_data import cifar_folder

from crossmae.cli import main
from crossmae.commands.ablate import CONTROL, NOT_LEARNED, aggregate, comparisons, markdown

TINY = ["model.img_size=32", "model.patch_size=8", "model.kwargs.embed_dim=32",
        "model.kwargs.depth=2", "model.kwargs.num_heads=2", "model.kwargs.decoder_embed_dim=16",
        "model.kwargs.decoder_num_heads=2", "data.num_workers=0", "train.batch_size=8",
        "train.max_steps=2", "train.precision=fp32", "train.device=cpu", "log.vis_images=2",
        "frozen.probe.epochs=2", "frozen.probe.warmup_epochs=0", "frozen.probe.batch_size=8",
        "frozen.probe.blrs=[0.1,1.0]"]  # fmt: skip


@pytest.mark.slow
def test_ablate_writes_one_table_and_continues_where_it_stopped(shared_dir, tmp_path, monkeypatch,
                                                                capfd):  # fmt: skip
    """Two variants, two seeds and the control, with ``--transfer finetune seg``: each stage on
    every variant's encoder and on the control, their metrics, gains and claims in the table;
    a second call runs nothing again."""
    train = cifar_folder(shared_dir, tmp_path / "train", per_class=6, classes=2)
    val = cifar_folder(shared_dir, tmp_path / "val", per_class=3, classes=2)
    camvid = shared_dir / "data" / "camvid"
    names = sorted(p.stem for p in (camvid / "images" / "train").iterdir())[:2]
    stages = [f"finetune.data.train={train}", f"finetune.data.val={val}",
              "finetune.train.epochs=1", "finetune.train.batch_size=4",
              "finetune.optim.warmup_epochs=0", "finetune.data.num_workers=0",
              f"seg.data.root={camvid}", "seg.data.val_split=train", f"seg.data.images={names}",
              "seg.data.crop=32", "seg.data.scale=[64,48]", "seg.eval.stride=21",
              "seg.model.patch_size=8", "seg.model.channels=8", "seg.model.aux_channels=8",
              "seg.train.steps=2", "seg.train.batch_size=2", "seg.optim.warmup_steps=1",
              "seg.data.num_workers=0"]  # fmt: skip
    out = tmp_path / "out"
    argv = ["ablate", "--train", str(train), "--val", str(val), "--out", str(out), "--variants",
            "mae", "crossmae_g0.25", "--seeds", "2", "--psnr-images", "4", "--transfer",
            "finetune", "seg", "--transfer-config",
            f"finetune={REPO / 'configs/cls/finetune_cifar10_few_labels.yaml'}",
            *TINY, *stages]  # fmt: skip
    assert main(argv) == 0
    err = capfd.readouterr().err  # where it stands: run k of 6, an ETA from the second on
    assert "ablate: run 1 of 6, mae seed 0\n" in err and "ablate: run 6 of 6, control seed 1" in err
    assert re.search(r"ablate: run 2 of 6, mae seed 1, about \S+ left for the 5 runs to go", err)
    result = json.loads((out / "ablation.json").read_text())
    assert list(result["table"]) == ["mae", "crossmae_g0.25", CONTROL]
    for name, row in result["table"].items():
        assert row["seeds"] == 2
        for m in ("decoder_gmacs", "img_per_s", "final_loss", "psnr", "knn_top1", "probe_top1",
                  "finetune_top1", "miou"):  # fmt: skip
            if name == CONTROL and m in ("decoder_gmacs", "img_per_s", "final_loss"):
                assert row[m] is None  # no decoder runs, nothing trains
                continue
            assert set(row[m]) == {"mean", "spread"} and row[m]["spread"] >= 0, m
        for m in ("knn_top1", "probe_top1", "finetune_top1", "miou"):  # each variant's gain
            if name != CONTROL:
                g = row["gain"][m]
                assert g["mean"] == pytest.approx(
                    row[m]["mean"] - result["table"][CONTROL][m]["mean"]
                )
                assert g["learned"] == (g["mean"] > g["spread"])
    assert [r["steps"] for r in result["runs"]] == [2, 2, 2, 2, 0, 0]
    for run in result["runs"]:  # every encoder, the control's too
        assert 0 <= run["finetune_top1"] <= 100 and 0 <= run["miou"] <= 100
    controls = [r for r in result["runs"] if r["variant"] == CONTROL]
    assert (
        controls[0]["knn_top1"] != controls[1]["knn_top1"]
        or controls[0]["psnr"] != controls[1]["psnr"]
    )  # one random init per seed
    control = out / "control" / "seed1" / "transfer"
    assert (control / "seg" / "results.json").is_file()
    cfg = (control / "finetune" / "config.yaml").read_text()
    assert "random_init: true" in cfg and "seed: 1" in cfg
    assert "layer_decay: 0.65" in cfg and "mixup: 0.0" in cfg  # the --transfer-config file
    # CrossMAE γ = 0.25 decodes a third of MAE's queries with cross-attention only: cheaper
    t = result["table"]
    assert t["crossmae_g0.25"]["decoder_gmacs"]["mean"] < t["mae"]["decoder_gmacs"]["mean"]
    (claim,) = result["comparisons"]
    assert claim["a"] == "crossmae_g0.25" and claim["knn_top1"]["verdict"] in (
        "no difference", "a better", "b better", NOT_LEARNED)  # fmt: skip
    assert {"finetune_top1", "miou"} <= set(claim)
    text = (out / "ablation.md").read_text()
    assert "| crossmae_g0.25 | 2 |" in text and "CrossMAE matches MAE" in text
    assert f"| {CONTROL} | 2 | - | - | - |" in text and "gain over control" in text
    assert "| variant | seeds | finetune finetune_top1 | gain over control | seg miou |" in text
    assert "--transfer finetune seg --transfer-config finetune=" in text.splitlines()[0]
    assert (out / "ablation.png").stat().st_size > 1000
    # a second call runs nothing again
    import crossmae.runner

    monkeypatch.setattr(crossmae.runner, "run_task", lambda *a, **k: pytest.fail("ran again"))
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert err.count("finished earlier, read from its folder") == 6


def test_ablate_names_an_unknown_variant(tmp_path, capsys):
    argv = ["ablate", "--train", "t", "--val", "v", "--out", str(tmp_path), "--variants", "nope"]
    assert main(argv) == 2
    assert "unknown variant(s) ['nope']" in capsys.readouterr().err
    argv = ["ablate", "--train", "t", "--val", "v", "--out", str(tmp_path), "--transfer", "frozen"]
    assert main(argv) == 2
    assert "--transfer: unknown stage(s) ['frozen']; choose from ['det', 'finetune', 'seg']" in (
        capsys.readouterr().err)  # fmt: skip
    argv[-1:] = ["finetune", "--transfer-config", "seg=configs/seg/overfit_camvid.yaml"]
    assert main(argv) == 2
    assert (
        "--transfer-config seg=configs/seg/overfit_camvid.yaml: expected STAGE=FILE with "
        "STAGE one of --transfer's ['finetune']" in capsys.readouterr().err
    )
    argv[-1:] = ["finetune=nowhere.yaml"]
    assert main(argv) == 2
    assert "--transfer-config finetune=nowhere.yaml: no such file" in capsys.readouterr().err


def rows(variant: str, knn: list[float], probe: list[float]) -> list[dict]:
    return [{"variant": variant, "kind": None, "decoder_gmacs": None, "img_per_s": None,
             "final_loss": None, "psnr": 15.0, "knn_top1": k, "probe_top1": p}
            for k, p in zip(knn, probe, strict=True)]  # fmt: skip


def test_claims_are_read_only_where_every_variant_beats_the_untrained_encoder():
    control = rows(CONTROL, [30.0, 31.0, 30.5], [32.0, 31.5, 32.5])
    # within the spreads of the control: nothing learned, whatever the difference between them
    noise = rows("crossmae_g0.25", [30.2, 31.4, 30.0], [32.1, 31.0, 32.0]) + rows(
        "mae", [29.0, 29.5, 29.2], [30.0, 30.5, 31.0]
    )
    (claim,) = comparisons(aggregate(noise + control))
    assert claim["knn_top1"]["verdict"] == NOT_LEARNED
    assert claim["probe_top1"]["verdict"] == NOT_LEARNED
    # one variant learned, the other did not: still not read
    one = rows("crossmae_g0.25", [40.0, 41.0, 40.5], [42.0, 41.0, 41.5]) + noise[3:]
    assert comparisons(aggregate(one + control))[0]["knn_top1"]["verdict"] == NOT_LEARNED
    # both beat the control beyond the spreads: the difference is read as before
    both = one[:3] + rows("mae", [36.0, 36.5, 37.0], [38.0, 38.5, 38.0])
    table = aggregate(both + control)
    assert table["mae"]["gain"]["knn_top1"]["learned"]
    (claim,) = comparisons(table)
    assert claim["knn_top1"]["verdict"] == "a better"
    assert claim["probe_top1"]["verdict"] == "a better"
    close = one[:3] + rows("mae", [40.2, 40.8, 40.6], [41.8, 41.2, 41.4])
    assert comparisons(aggregate(close + control))[0]["knn_top1"]["verdict"] == "no difference"


def test_a_table_without_a_claim_has_no_claims_table():
    table = aggregate(rows("crossmae_g0.25", [37.0, 38.0], [47.0, 48.0])
                      + rows(CONTROL, [30.0, 31.0], [41.0, 42.0]))  # fmt: skip
    text = markdown(table, comparisons(table), "header", {})
    assert "| crossmae_g0.25 | 2 |" in text and "claim (a vs b)" not in text
