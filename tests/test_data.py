"""Data: folder layouts, bad files, the resumable sharded sampler, seeded augmentation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from crossmae.data import (
    BuiltinPhotos,
    ImageFiles,
    PretrainSamples,
    PretrainTransform,
    ResumableSampler,
    collate,
    normalize_pixels,
)
from crossmae.models.masking import MaskSampler


def cifar_folder(shared_dir: Path, dest: Path, per_class: int = 3, classes: int = 2) -> Path:
    """A small ImageFolder of real CIFAR-10 JPEGs, copied into a temporary folder."""
    src = shared_dir / "data" / "cifar10" / "train"
    for cls in sorted(p.name for p in src.iterdir())[:classes]:
        (dest / cls).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[:per_class]:
            shutil.copy(f, dest / cls / f.name)
    return dest


def add_bad_files(folder: Path, good_jpeg: Path) -> None:
    """A corrupt JPEG, a truncated JPEG, a text file named .png, and a non-image file."""
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    data = good_jpeg.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "fake.png").write_text("hello")
    (folder / "notes.txt").write_text("not an image")


def test_imagefolder_and_flat_layouts(shared_dir, tmp_path):
    root = cifar_folder(shared_dir, tmp_path / "tree")
    tree = ImageFiles(root)
    assert tree.layout == "imagefolder" and tree.classes == ["airplane", "automobile"]
    assert len(tree) == 6 and tree.labels == [0, 0, 0, 1, 1, 1]
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in list((root / "airplane").iterdir()):
        shutil.copy(f, flat / f.name)
    files = ImageFiles(flat)
    assert files.layout == "flat" and len(files) == 3 and files.labels == [-1] * 3
    assert files.load(0).mode == "RGB"


def test_bad_paths_fail_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFiles(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageFiles(tmp_path / "empty")
    (tmp_path / "file.jpg").write_text("x")
    with pytest.raises(NotADirectoryError):
        ImageFiles(tmp_path / "file.jpg")


def test_unreadable_files_are_skipped_and_reported(shared_dir, tmp_path):
    root = cifar_folder(shared_dir, tmp_path / "d", per_class=2, classes=1)
    cls = root / "airplane"
    add_bad_files(cls, next(cls.iterdir()))
    source = ImageFiles(root)
    assert len(source) == 5 and source.ignored == 1  # notes.txt
    ds = PretrainSamples(source, PretrainTransform(32), MaskSampler((4, 4)))
    batch = collate([ds[(i, i)] for i in range(len(ds))])
    assert batch["images"].shape == (5, 3, 32, 32) and batch["ids_shuffle"].shape == (5, 16)
    bad = {Path(s.split(" (")[0]).name for s in batch["skipped"]}
    assert bad == {"corrupt.jpg", "truncated.jpg", "fake.png"}


def test_sampler_shards_cover_the_single_process_batches():
    n, B = 50, 8
    one = list(ResumableSampler(n, per_rank_step=B, seed=1))
    two = [
        list(ResumableSampler(n, per_rank_step=B // 2, num_replicas=2, rank=r, seed=1))
        for r in (0, 1)
    ]
    assert len(one) == 48  # trimmed to whole global steps
    for step in range(6):
        global_batch = set(one[step * B : (step + 1) * B])
        sharded = set(two[0][step * 4 : (step + 1) * 4]) | set(two[1][step * 4 : (step + 1) * 4])
        assert sharded == global_batch
    # another epoch is another permutation; a mid-epoch start skips exactly the done steps
    s = ResumableSampler(n, per_rank_step=B, seed=1)
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch1 != one
    s.set_epoch(1, start_step=4)
    assert list(s) == epoch1[4 * B :] and len(s) == 2 * B
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(5, per_rank_step=8)


def test_augmentation_and_masks_are_a_function_of_the_seed():
    ds = PretrainSamples(BuiltinPhotos(16), PretrainTransform(32), MaskSampler((4, 4)))
    a, b, c = ds[(3, 123)], ds[(3, 123)], ds[(3, 124)]
    assert torch.equal(a.image, b.image) and torch.equal(a.ids_shuffle, b.ids_shuffle)
    assert not torch.equal(a.image, c.image)
    assert sorted(a.ids_shuffle.tolist()) == list(range(16))


def test_uint8_crops_normalised_later_are_the_normalised_crops_bit_for_bit():
    """Pretraining ships uint8 crops and normalises them on the device: same numbers as
    normalising in the worker, with the same seeds."""
    floats = PretrainSamples(BuiltinPhotos(16), PretrainTransform(32), MaskSampler((4, 4)))
    pixels = PretrainSamples(
        BuiltinPhotos(16), PretrainTransform(32, normalize=False), MaskSampler((4, 4))
    )
    keys = [(i, 50 + i) for i in range(6)]
    ref, raw = collate([floats[k] for k in keys]), collate([pixels[k] for k in keys])
    assert raw["images"].dtype == torch.uint8 and raw["images"].shape == (6, 3, 32, 32)
    assert torch.equal(normalize_pixels(raw["images"]), ref["images"])
    assert torch.equal(raw["ids_shuffle"], ref["ids_shuffle"])
    for bad in (ref["images"], raw["images"][:, :2]):
        with pytest.raises(ValueError, match="expected uint8 RGB pixels"):
            normalize_pixels(bad)


@pytest.mark.gpu
def test_prefetched_batches_arrive_intact_and_in_order():
    """CudaPrefetcher copies batch i + 1 on a side stream while the current stream is busy with
    work on batch i (a long chain of products here): every batch arrives whole, in order, and
    the entries it does not copy pass through."""
    from crossmae.data import CudaPrefetcher

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    batches = [{"images": torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8,
                                        generator=g).pin_memory(),
                "ids_shuffle": torch.randperm(196, generator=g).repeat(64, 1).pin_memory(),
                "skipped": [f"file {i}"]} for i in range(6)]  # fmt: skip
    busy = torch.randn(4096, 4096, device=device)
    seen = []
    for batch in CudaPrefetcher(iter(batches), device):
        assert batch["images"].is_cuda and batch["ids_shuffle"].is_cuda
        for _ in range(20):  # keeps the current stream busy while the next copy is in flight
            busy = torch.tanh(busy @ busy)
        seen.append((batch["images"].clone(), batch["ids_shuffle"].clone(), batch["skipped"]))
    assert len(seen) == len(batches)
    for (imgs, ids, skipped), ref in zip(seen, batches, strict=True):
        assert torch.equal(imgs.cpu(), ref["images"]) and torch.equal(ids.cpu(), ref["ids_shuffle"])
        assert skipped == ref["skipped"]


def test_gpu_pipeline_code_path_on_cpu(shared_dir, tmp_path):
    """The device-decode pipeline (run here with the CPU as the device) draws the same boxes,
    flips and masks as the PIL pipeline and gives images of the same content."""
    from crossmae.data.gpu import JpegSamples, collate_raw, decode_batch

    root = cifar_folder(shared_dir, tmp_path / "d", per_class=4, classes=1)
    add_bad_files(root / "airplane", next((root / "airplane").iterdir()))
    source = ImageFiles(root)
    raw = JpegSamples(source, 32, MaskSampler((4, 4)))
    pil = PretrainSamples(source, PretrainTransform(32), MaskSampler((4, 4)))
    keys = [(i, 100 + i) for i in range(len(source))]
    batch = collate_raw([raw[k] for k in keys])
    imgs = decode_batch(batch, 32, torch.device("cpu"))
    ref = collate([pil[k] for k in keys])
    assert imgs.shape == ref["images"].shape == (len(source), 3, 32, 32)
    assert torch.equal(batch["ids_shuffle"], ref["ids_shuffle"])
    # same crop and flip: the two resamplers differ slightly, the content does not
    good = [i for i, s in enumerate(batch["names"]) if "jpg" in s and "truncated" not in s]
    diff = (imgs[good] - ref["images"][good]).abs().mean().item()
    assert diff < 0.15, diff
    skipped = {Path(s.split(" (")[0]).name for s in batch["skipped"] + ref["skipped"]}
    assert {"corrupt.jpg", "fake.png"} <= skipped
