"""One checkpoint format for the whole project: plain dicts of tensors and plain values, loadable
with ``torch.load(weights_only=True)``; strict loading by assertion on the exact key sets.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    allow_missing: Iterable[str] = (),
    what: str = "checkpoint",
) -> None:
    """Load ``state_dict`` into ``module``; any unexpected key, any missing key not listed in
    ``allow_missing`` and any shape mismatch is an error that names them (the first 8 of each
    kind, and how many more)."""
    own = module.state_dict()
    allow = set(allow_missing)
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(set(own) - set(state_dict) - allow)
    shapes = sorted(
        f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )

    def listing(items: list[str]) -> str:
        more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
        return f"{items[:8]}{more}"

    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys {listing(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} missing keys {listing(missing)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches {listing(shapes)}")
    if problems:
        raise KeyError(f"{what} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(dict(state_dict), strict=not allow)


# ----------------------------------------------------------------------------- files
LAST = "checkpoint-last.pt"

# ----------------------------------------------------------------------------- formats
FORMATS: dict[str, str] = {}  # a checkpoint's "format" value -> what such a file holds


def register_format(name: str, what: str) -> str:
    """Declare a checkpoint format: the ``"format"`` value of the files a task writes, and what
    they hold (named when a file of another format is given). Returns ``name``."""
    if FORMATS.get(name, what) != what:
        raise ValueError(f"checkpoint format {name!r} is already registered as {FORMATS[name]!r}")
    FORMATS[name] = what
    return name


def describe_format(name: str) -> str:
    what = FORMATS.get(name)
    return f"a {name!r} checkpoint" + (f" ({what})" if what else "")


PRETRAIN_FORMAT = register_format(
    "crossmae-pretrain-v1", "a pretraining model and its training state"
)
ENCODER_FORMAT = register_format("crossmae-encoder-v1", "an encoder export, encoder.pt")


def _replace_atomic(path: str | Path, write) -> Path:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed over
    it: a crash at any point leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        cause = e if isinstance(e, OSError) else e.__cause__ or e
        kept = "the previous file is kept" if Path(path).exists() else "no file was written"
        raise OSError(f"could not write {path} ({kept}): {cause}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_atomic(obj: dict, path: str | Path) -> Path:
    """``torch.save`` that replaces ``path`` atomically."""
    return _replace_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file (results, configs) that replaces ``path`` atomically."""
    return _replace_atomic(path, lambda f: f.write(text.encode()))


def strict_json(value: Any, **kwargs) -> str:
    """``json.dumps`` that JSON readers accept: a NaN or an infinity (no JSON number) is written
    null."""
    import json
    import math

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False, **kwargs)


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a file, a missing, truncated or foreign file being an
    error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"{path} is not a loadable checkpoint ({type(e).__name__}: {first})"
        ) from e


def check_output(src: str | Path, dest: str | Path, *, writes: str | None = None,
                 force: bool = False) -> None:  # fmt: skip
    """Before a converter writes ``dest`` from ``src``: the input itself is never replaced, and
    an existing file is replaced only if it is of the kind being written (``writes``: our
    checkpoint format, None: another framework's layout), or with ``force``."""
    dest = Path(dest)
    if not dest.exists():
        return
    if Path(src).exists() and os.path.samefile(src, dest):
        raise ValueError(f"{dest} is the input file: write the output to another file")
    if force:
        return
    try:
        try:
            data = torch.load(dest, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip archive: the legacy format cannot be mapped
            data = torch.load(dest, map_location="cpu", weights_only=True)
    except Exception:
        raise ValueError(f"{dest} exists and is not a checkpoint: add --force to replace it, or "
                         "write to another file") from None  # fmt: skip
    found = data.get("format") if isinstance(data, dict) else None
    if found != writes:
        what = describe_format(found) if found else "a checkpoint of another framework's layout"
        raise ValueError(f"{dest} exists and is {what}: add --force to replace it, or write to "
                         "another file")  # fmt: skip


def load_checkpoint(
    path: str | Path,
    expect: str | Iterable[str] | None = None,
    map_location: str | torch.device = "cpu",
) -> dict:
    """Load one of our checkpoints (plain dicts, ``weights_only``). ``expect``: the format(s) the
    caller reads; a file of another format is an error naming what it is and what was expected
    (``FORMATS`` describes each)."""
    ckpt = read_torch_file(path, map_location)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("format"), str):
        raise ValueError(f"{path} is not a crossmae checkpoint (no 'format' key)")
    wanted = [expect] if isinstance(expect, str) else list(expect or ())
    if wanted and ckpt["format"] not in wanted:
        raise ValueError(f"{path} is {describe_format(ckpt['format'])}, not "
                         f"{' or '.join(describe_format(w) for w in wanted)}")  # fmt: skip
    return ckpt


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint ``--resume auto`` continues from, if the folder holds one."""
    path = Path(out_dir) / LAST
    return path if path.is_file() else None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


class SafeUnpickler(pickle.Unpickler):
    """Unpickles tensors, numpy arrays, containers and numbers, and never runs code: any other
    class a file names (another framework's logger state, an ``argparse.Namespace``, ...) becomes
    an inert placeholder, or, with ``strict``, refuses the file."""

    ALLOWED = {
        ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
        ("builtins", "slice"), ("builtins", "complex"), ("_codecs", "encode"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"), ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch", "Size"), ("torch", "device"),
    }  # fmt: skip

    def __init__(self, file, *, strict: bool = False, **kwargs):
        super().__init__(file, **kwargs)
        self.strict = strict

    def find_class(self, module: str, name: str):
        allowed = (
            (module, name) in self.ALLOWED
            or module == "numpy.dtypes"
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if allowed:
            if module.startswith("numpy.core."):  # numpy 2 moved it
                module = module.replace("numpy.core.", "numpy._core.")
            return super().find_class(module, name)
        if self.strict:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a pickle")
        return type(name, (_Inert,), {"__module__": module})


class _Inert:
    """Stands for an object of a class a checkpoint names but that is not loaded."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def load_foreign_checkpoint(path: str | Path) -> Any:
    """Another framework's torch checkpoint (mmengine, detectron2, ...), read without running any
    of its pickled code (``SafeUnpickler``): tensors and plain values come back as they are,
    other objects as inert placeholders."""
    import types

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    safe = types.SimpleNamespace(
        __name__="crossmae_safe_pickle",
        Unpickler=SafeUnpickler,
        load=lambda f, **kw: SafeUnpickler(f, **kw).load(),
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe)
    except Exception as e:
        msg = f"{path} is not a readable torch checkpoint ({type(e).__name__})"
        raise ValueError(msg) from None


# ----------------------------------------------------------------------------- random streams
def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's and Python's global generators: augmentations drawn
    from any of them (timm's RandAugment and random erasing use Python's) repeat run to run."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def random_states() -> dict[str, Any]:
    """This process's random streams, for exact resumption: torch's CPU generator, every CUDA
    device's (empty without CUDA), numpy's and Python's global ones; tensors and plain values
    only (``weights_only`` loadable)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },  # fmt: skip
        "python": [list(s) if isinstance(s, tuple) else s for s in random.getstate()],
    }


def restore_random_states(state: dict[str, Any]) -> None:
    """The inverse of ``random_states``. States saved before numpy and Python were included (or
    with one CUDA device's state under ``cuda``) restore what they hold."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if torch.cuda.is_available() and cuda is not None and len(cuda):
        if isinstance(cuda, torch.Tensor):  # one device's state
            torch.cuda.set_rng_state(cuda)
        else:
            torch.cuda.set_rng_state_all(cuda)
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["gauss"]))  # fmt: skip
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
