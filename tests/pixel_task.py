"""A task outside the product packages (per-pixel grey-level regression); importing registers it."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from crossmae.bench import BenchCase, bench_encoder, register_bench_case
from crossmae.checks import section
from crossmae.config import EncoderSource, LogConfig, OptimConfig, TrainConfig
from crossmae.data import Indexed
from crossmae.evaluation import DatasetEvaluator, Evaluation, inference_on_dataset
from crossmae.models import VisionTransformer
from crossmae.models.pretrained import load_pretrained_encoder
from crossmae.task import Task, TransferStage, register_task


@dataclass
class PixelConfig:
    encoder: EncoderSource = field(default_factory=EncoderSource)
    output_dir: str = "???"
    optim: OptimConfig = section(OptimConfig, lr=1e-3)
    train: TrainConfig = section(TrainConfig, steps=4, batch_size=4, precision="fp32")
    log: LogConfig = section(LogConfig, resumable=True, every_steps=1, progress=False)


class PixelHead(nn.Module):
    def __init__(self, encoder: VisionTransformer):
        super().__init__()
        self.encoder, self.p = encoder, encoder.patch_size
        self.head = nn.Linear(encoder.embed_dim, self.p**2)

    def forward(self, x):  # (B, 3, H, W) -> (B, L, p*p) grey levels of each patch's pixels
        return self.head(self.encoder.forward_features(x)[:, 1:])


@register_task
class PixelTask(Task):
    name, command, schema, format = "pixel", ("pixel", "train"), PixelConfig, "test-pixel-v1"
    transfer = TransferStage("pixel", 9, "configs/pixel_{size}.yaml", {}, (("MSE", ("mse",)),))

    def build_model(self, device):
        sd, cfg = load_pretrained_encoder(self.cfg.encoder.checkpoint)
        (encoder := VisionTransformer(**cfg)).load_state_dict(sd)
        return PixelHead(encoder).to(device)

    def train_set(self):  # 16 random images
        g, size = torch.Generator().manual_seed(0), self.model.encoder.img_size
        return Indexed(torch.rand(16, 3, *size, generator=g))

    def inputs(self, batch, device):
        return {"x": batch.to(device)}

    def losses(self, model, x):
        target = F.unfold(x.mean(1, keepdim=True), self.model.p, stride=self.model.p)
        return {"loss": F.mse_loss(model(x), target.transpose(1, 2))}

    def evaluation(self):
        def mse(step):  # 4 other random images, through the library's evaluation loop
            g, size = torch.Generator().manual_seed(1), self.model.encoder.img_size
            images = torch.rand(4, 3, *size, generator=g)
            return inference_on_dataset(
                self.model, images, PixelEvaluator(self.model.p), precision="fp32", batch_size=4
            )

        return Evaluation(mse)


class PixelEvaluator(DatasetEvaluator):
    """Mean squared error of the predicted grey levels over every pixel of every image."""

    desc = "pixel MSE"

    def __init__(self, patch_size):
        self.p = patch_size

    def model_inputs(self, batch, device):
        return batch.to(device)

    def process(self, inputs, outputs):
        target = F.unfold(inputs.mean(1, keepdim=True), self.p, stride=self.p).transpose(1, 2)
        self.results.append(
            (float(F.mse_loss(outputs.cpu(), target, reduction="sum")), target.numel())
        )

    def evaluate(self):
        return {"mse": sum(r[0] for r in self.results) / sum(r[1] for r in self.results)}


@register_bench_case("pixel")
def pixel_bench_case(tiny, batch, device):
    (task := PixelTask(None)).model = PixelHead(VisionTransformer(**bench_encoder(tiny))).to(device)
    x = torch.rand(batch or 4, 3, *task.model.encoder.img_size, device=device)
    return BenchCase(task, task.model, x, len(x), "fp32", lambda: task.model(x))
