"""Helper for test_seg: slide-window evaluation of a fixed tiny UperNet on CamVid val images,
one process or every process of torchrun (each its shard), confusion matrices summed."""

import json
import sys

import torch

from crossmae import distributed as du
from seg.data import CAMVID, IGNORE, SegFolder
from seg.evaluate import slide_inference
from seg.metrics import SegMetrics
from seg.model import SegViT, UperNet

root, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
du.init_from_env("cpu")
torch.manual_seed(0)
model = UperNet(
    SegViT(img_size=64, embed_dim=32, depth=4, num_heads=2), 11, channels=16, aux_channels=8
).eval()
data = SegFolder(root, "val", CAMVID)
metrics = SegMetrics(11, IGNORE)
for i in du.shard(n, du.rank(), du.world_size()):
    img, label, _ = data[i]
    img = img[None, :, ::4, ::4].float() / 255  # 90 x 120: not a multiple of the stride
    pred = slide_inference(model, img, 11, crop=64, stride=43).argmax(1)[0]
    metrics.update(pred, label[::4, ::4])
metrics.all_reduce()
with open(f"{out}-{du.rank()}.json", "w") as f:
    json.dump({"cm_total": int(metrics.cm.sum()), **metrics.compute()}, f)
