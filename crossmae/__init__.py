"""crossmae: CrossMAE visual pretraining (arXiv:2401.14391) and its transfer evaluation."""

from importlib.metadata import PackageNotFoundError, version

from .models import create_model, list_models

try:
    __version__ = version("crossmae")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "create_model", "list_models"]
