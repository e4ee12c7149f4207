"""CrossMAE and MAE pretraining models, the ViT encoder, and the official-checkpoint converters."""

from .crossmae import CrossMAE
from .mae import MAE
from .official import from_official, to_official
from .registry import create_model, list_models, model_class, register_model
from .vit import VisionTransformer

__all__ = [
    "MAE",
    "CrossMAE",
    "VisionTransformer",
    "create_model",
    "from_official",
    "list_models",
    "model_class",
    "register_model",
    "to_official",
]
