"""Checkpoint dialects' vocabularies, shared by the exporters (:mod:`quantport.export.targets`) and the
loaders (:mod:`quantport.loader`): which name, shape and config string each dialect gives a codec's
neutral pieces (:class:`~quantport.formats.pieces.Piece`), in both directions.

* :mod:`.modelopt`: ModelOpt's ``quant_algo`` table and tensor names (Linear and fused experts);
* :mod:`.compressed_tensors`: the ``QuantizationArgs`` rows, tensor names and shapes, and the reverse
  lookup from stored arguments to a scheme;
* :mod:`.mxfp4_native`: gpt-oss's ``*_blocks`` / ``*_scales``.

Nothing here imports :mod:`quantport.export`, compressed-tensors or a model: the loader reads these
tables without the writers. :class:`ExportFormat`, the dialects' names, is here because the command line
reads it without importing torch.
"""

import importlib
import pkgutil
from enum import Enum
from typing import Any

__all__ = ["ExportFormat", "declared"]


class ExportFormat(str, Enum):
    """Checkpoint formats (dialects) quantport writes; each has one writer module in
    :mod:`quantport.export.targets`, found there by discovery."""

    MODELOPT = "modelopt"
    """NVIDIA ModelOpt unified HF checkpoint (``quant_method: modelopt``): vLLM, SGLang, TensorRT-LLM."""
    COMPRESSED_TENSORS = "compressed-tensors"
    """compressed-tensors checkpoint (``quant_method: compressed-tensors``): vLLM, SGLang, transformers."""
    MXFP4 = "mxfp4"
    """gpt-oss's native MXFP4 MoE checkpoint (``quant_method: mxfp4``, ``*_blocks`` / ``*_scales``):
    vLLM, SGLang, transformers. MXFP4 experts only; everything else in the model dtype."""

    def __str__(self) -> str:
        return self.value


def declared(attribute: str) -> list[Any]:
    """The value of ``attribute`` in every dialect module of this package that defines it, in module-name
    order. Dialects declare their reader (:class:`quantport.read.quant_config.DialectReader`, as ``READER``)
    and their checker contract (:class:`quantport.check.specs.LayerContract`, as ``LAYER_CONTRACT``) this
    way, so neither :mod:`quantport.read` nor :mod:`quantport.check` lists dialects. Importing the modules
    imports torch, so callers look here only for a dialect they do not know themselves."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        value = getattr(importlib.import_module(f"{__name__}.{info.name}"), attribute, None)
        if value is not None:
            found.append(value)
    return found
