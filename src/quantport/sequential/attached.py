"""Which models run layer by layer: the :class:`~quantport.sequential.layer_store.LayerStore` kept on them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .layer_store import LayerStore

__all__ = ["attach_layer_store", "layer_store_of"]

_ATTR = "_quantport_layer_store"


def attach_layer_store(model: nn.Module, store: LayerStore) -> None:
    model.__dict__[_ATTR] = store


def layer_store_of(model: nn.Module) -> LayerStore | None:
    """The model's layer store when it was opened layer by layer (its decoder layers hold no tensors)."""
    return model.__dict__.get(_ATTR)
