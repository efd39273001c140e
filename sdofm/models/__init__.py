"""Model registry: ``get_model(name, **overrides)`` builds a flavour of ``FLAVOURS``;
``FAMILIES`` says where each family's model, encoder and objective live.

Models are plain PyTorch modules; training and distribution live elsewhere. Importing this
package does not import torch (``sdofm.config`` reads the flavour table); building a model does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sdofm.models.flavours import FAMILIES, FEATURE_FAMILY, FLAVOURS, Family, Flavour

if TYPE_CHECKING:
    from torch import nn


def resolve(path: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (importing the module)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def list_models() -> list[str]:
    """Registered flavour names."""
    return list(FLAVOURS)


def family_of(name: str) -> str:
    """The family of flavour ``name``."""
    try:
        return FLAVOURS[name].family
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(FLAVOURS)}") from None


def get_model(name: str, **overrides: Any) -> nn.Module:
    """Build flavour `name`; `overrides` replace its constructor arguments (e.g. img_size=64)."""
    family = family_of(name)
    return resolve(FAMILIES[family].model)(**{**FLAVOURS[name].args, **overrides})


def encoder_class(family: str) -> type[nn.Module]:
    """The encoder class of ``family`` (what finetuning heads sit on)."""
    return resolve(FAMILIES[family].encoder)


def family_of_encoder(encoder: nn.Module) -> str | None:
    """The family whose encoder class ``encoder`` is, or None."""
    return next((f for f in FAMILIES if type(encoder) is encoder_class(f)), None)


__all__ = [
    "FAMILIES",
    "FEATURE_FAMILY",
    "FLAVOURS",
    "Family",
    "Flavour",
    "encoder_class",
    "family_of",
    "family_of_encoder",
    "get_model",
    "list_models",
    "resolve",
]
