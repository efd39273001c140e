"""Model registry: ``get_model(name, **overrides)`` builds a registered configuration.

Models are plain PyTorch modules; training and distribution live elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from sdofm.models.mae import (
    MAEEncoder,
    MaskedAutoencoder,
    mae_32m,
    mae_104m,
    mae_debug,
    mae_tiny,
    prithvi_temporal,
)

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mae_debug": mae_debug,
    "mae_tiny": mae_tiny,
    "mae_32m": mae_32m,
    "mae_104m": mae_104m,
    "prithvi_temporal": prithvi_temporal,
}
"""Model name -> builder; a builder's keyword arguments replace its configuration's."""


def list_models() -> list[str]:
    """Registered model names."""
    return list(MODELS)


def get_model(name: str, **overrides: Any) -> nn.Module:
    """Build model `name`; `overrides` replace constructor arguments (e.g. img_size=64)."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None
    return builder(**overrides)


__all__ = ["MODELS", "MAEEncoder", "MaskedAutoencoder", "get_model", "list_models"]
