"""A task outside the product packages (per-pixel grey-level regression); importing registers it."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from crossmae.config import EncoderSource, LogConfig, OptimConfig, TrainConfig, section
from crossmae.data import Indexed
from crossmae.models import VisionTransformer
from crossmae.models.pretrained import load_pretrained_encoder
from crossmae.task import BenchCase, Task, TransferStage, bench_encoder, register_task


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

    def losses(self, forward, x):
        target = F.unfold(x.mean(1, keepdim=True), self.model.p, stride=self.model.p)
        return {"loss": F.mse_loss(forward(x), target.transpose(1, 2))}

    @torch.no_grad()
    def evaluate(self, step):  # 4 other random images
        g, size = torch.Generator().manual_seed(1), self.model.encoder.img_size
        x = torch.rand(4, 3, *size, generator=g).to(self.device)
        return {"mse": float(self.losses(self.model, x)["loss"])}

    @classmethod
    def benchmark_case(cls, tiny, batch, device):
        (task := cls(None)).model = PixelHead(VisionTransformer(**bench_encoder(tiny))).to(device)
        x = torch.rand(batch or 4, 3, *task.model.encoder.img_size, device=device)
        return BenchCase(task, task.model, x, len(x), "fp32", lambda: task.model(x))
