"""Command-line entry points."""

from __future__ import annotations

from crossmae.cli import main


def test_models_params_prints_the_reference_counts(capsys):
    # docs/reference.md: CrossMAE-B (12 decoder blocks, IBA over all maps + input) 347 keys,
    # 127.29 M; MAE-B 254 keys, 111.91 M
    assert main(["models", "*_vit_base_patch16", "--params"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert rows["crossmae_vit_base_patch16"][:2] == ["347", "127.29"]
    assert rows["mae_vit_base_patch16"][:2] == ["254", "111.91"]


def test_models_lists_names(capsys):
    assert main(["models", "mae_*"]) == 0
    sizes = [
        "base_patch16",
        "huge_patch14",
        "large_patch16",
        "small_patch16",
        "tiny_patch16",
        "tiny_patch8",
    ]
    assert capsys.readouterr().out.split() == [f"mae_vit_{s}" for s in sizes]
    assert main(["models", "nothing*"]) == 1
