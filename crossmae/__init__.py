"""crossmae: CrossMAE visual pretraining (arXiv:2401.14391) and its transfer evaluation."""

import os

# OpenMP threads that wait by sleeping, not spinning, unless the environment says otherwise:
# read when torch loads its OpenMP library, so set before torch is imported. With another busy
# process on the cores, a spinning wait made a CPU training step 4.5 times its idle time; a
# passive one 1.8 times, and the idle step no slower (docs/results.md, "CPU threads").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .version import __version__  # noqa: E402

__all__ = ["__version__", "create_model", "list_models"]


def __getattr__(name: str):
    """``create_model`` and ``list_models`` imported when first used: ``import crossmae`` (and
    the command line's help) does not load torch."""
    if name in ("create_model", "list_models"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'crossmae' has no attribute {name!r}")
