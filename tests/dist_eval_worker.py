"""Helper for test_cls: evaluate a fixed classifier (1 process, or every process of torchrun)."""

import json
import sys

import torch

from cls.data import class_folders
from cls.encoder import build_classifier
from cls.finetune import evaluate_classifier as evaluate
from crossmae import distributed as du
from crossmae.models.pretrained import load_pretrained_encoder

checkpoint, train, val, out = sys.argv[1:5]
device = du.init_from_env("cpu")
tr, va = class_folders(train, val)
sd, cfg = load_pretrained_encoder(checkpoint)
torch.manual_seed(0)
model = build_classifier(sd, cfg, num_classes=len(tr.classes), img_size=32)
result = evaluate(model.to(device), va, 32, batch_size=4, workers=0)
with open(f"{out}-{du.rank()}.json", "w") as f:
    json.dump(result, f)
