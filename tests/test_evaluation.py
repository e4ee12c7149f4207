"""The one evaluation loop (``crossmae.evaluation.inference_on_dataset``) and its evaluators."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from crossmae.config import ConfigError
from crossmae.evaluation import DatasetEvaluator, inference_on_dataset

ROOT = Path(__file__).resolve().parents[1]


class Recorder(DatasetEvaluator):
    """Keeps what the loop hands it: inputs, output dtypes, the model's mode and grad state."""

    def __init__(self, model, fail_at=None):
        self.model, self.fail_at = model, fail_at

    def process(self, inputs, outputs):
        if self.fail_at is not None and len(self.results) == self.fail_at:
            raise RuntimeError("evaluation failed")
        self.results.append((inputs[0].tolist(), outputs.dtype, self.model.training,
                             torch.is_grad_enabled()))  # fmt: skip

    def evaluate(self):
        return {"items": [x for r in self.results for x in r[0]],
                "dtypes": {r[1] for r in self.results}, "modes": {r[2] for r in self.results},
                "grad": {r[3] for r in self.results}}  # fmt: skip


def items(n: int) -> list:
    return [(torch.full((2,), float(i)), i) for i in range(n)]


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_loop_evaluates_every_item_once_in_eval_mode_and_restores_the_mode(precision, dtype):
    model = nn.Linear(2, 3)
    out = inference_on_dataset(model, items(7), Recorder(model), precision=precision,
                               batch_size=3)  # fmt: skip
    assert sorted(out["items"]) == [[float(i)] * 2 for i in range(7)]
    assert out["dtypes"] == {dtype}  # the evaluation's autocast
    assert out["modes"] == {False} and out["grad"] == {False}
    assert model.training  # restored
    model.eval()
    inference_on_dataset(model, items(2), Recorder(model), precision="fp32")
    assert not model.training  # a model in eval mode stays in it


def test_the_mode_is_restored_when_an_evaluation_fails_and_a_bad_precision_is_named():
    model = nn.Linear(2, 3)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        inference_on_dataset(model, items(4), Recorder(model, fail_at=1), precision="fp32")
    assert model.training
    with pytest.raises(ConfigError, match="eval.precision must be one of"):
        inference_on_dataset(model, items(4), Recorder(model), precision="fp64")
    with pytest.raises(ConfigError, match="eval.precision must be one of"):
        inference_on_dataset(model, items(4), Recorder(model), precision="auto")


def test_a_task_outside_the_product_evaluates_through_the_loop():
    from pixel_task import PixelEvaluator, PixelHead

    from crossmae.models import VisionTransformer

    torch.manual_seed(0)
    model = PixelHead(VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1,
                                        num_heads=2))  # fmt: skip
    x = torch.rand(5, 3, 16, 16)
    whole = inference_on_dataset(model, x, PixelEvaluator(8), precision="fp32", batch_size=5)
    in_twos = inference_on_dataset(model, x, PixelEvaluator(8), precision="fp32", batch_size=2)
    target = nn.functional.unfold(x.mean(1, keepdim=True), 8, stride=8).transpose(1, 2)
    with torch.no_grad():
        expected = float(nn.functional.mse_loss(model(x), target))
    assert whole["mse"] == pytest.approx(expected, rel=1e-6)
    assert in_twos["mse"] == pytest.approx(expected, rel=1e-6)


EVALUATORS = ("cls/finetune.py", "det/evaluate.py", "seg/evaluate.py", "crossmae/knn.py")


def test_one_place_shards_evaluations_and_switches_to_eval_mode():
    """Sharding a dataset, eval mode and its restoration and the gathering of every process's
    part live in crossmae/evaluation.py only: the product's evaluators (top-1, COCO AP, mIoU,
    frozen features) go through its loop."""
    loop = ("du.shard(", ".eval()", "all_gather", "all_reduce", ".train(", "Progress(")
    shards = {p.relative_to(ROOT).as_posix() for package in ("crossmae", "cls", "det", "seg")
              for p in (ROOT / package).rglob("*.py") if "du.shard(" in p.read_text()}  # fmt: skip
    assert shards == {"crossmae/evaluation.py"}
    for name in EVALUATORS:
        text = (ROOT / name).read_text()
        assert "inference_on_dataset(" in text, name
        assert [w for w in loop if w in text] == [], name
    text = (ROOT / "crossmae/evaluation.py").read_text()
    assert all(w in text for w in ("du.shard(", "model.eval()", "all_gather_objects("))
