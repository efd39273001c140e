"""Model registry: ``get_model(name, **overrides)`` builds a flavour of ``FLAVOURS``.

Models are plain PyTorch modules; training and distribution live elsewhere. Importing this
package does not import torch (``sdofm.config`` reads the flavour table); building a model does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdofm.models.flavours import FLAVOURS, Flavour

if TYPE_CHECKING:
    from torch import nn


def families() -> dict[str, type[nn.Module]]:
    """Model family -> class. Imports torch, hence a function rather than a module constant."""
    from sdofm.models.mae import MaskedAutoencoder
    from sdofm.models.nvae import NVAE

    return {"mae": MaskedAutoencoder, "nvae": NVAE}


def encoders() -> dict[str, type[nn.Module]]:
    """Model family -> its encoder class (what finetuning heads sit on)."""
    from sdofm.models.mae import MAEEncoder
    from sdofm.models.nvae import NVAEEncoder

    return {"mae": MAEEncoder, "nvae": NVAEEncoder}


def list_models() -> list[str]:
    """Registered flavour names."""
    return list(FLAVOURS)


def get_model(name: str, **overrides: Any) -> nn.Module:
    """Build flavour `name`; `overrides` replace its constructor arguments (e.g. img_size=64)."""
    try:
        flavour = FLAVOURS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(FLAVOURS)}") from None
    return families()[flavour.family](**{**flavour.args, **overrides})


__all__ = ["FLAVOURS", "Flavour", "encoders", "families", "get_model", "list_models"]
