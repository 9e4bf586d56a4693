"""Checkpoint dialects' vocabularies, shared by the exporters (:mod:`quantport.export.targets`) and the
loaders (:mod:`quantport.loader`): which name, shape and config string each dialect gives a codec's
neutral pieces (:class:`~quantport.formats.pieces.Piece`), in both directions.

* :mod:`.modelopt`: ModelOpt's ``quant_algo`` table and tensor names (Linear and fused experts);
* :mod:`.compressed_tensors`: the ``QuantizationArgs`` rows, tensor names and shapes, and the reverse
  lookup from stored arguments to a scheme;
* :mod:`.mxfp4_native`: gpt-oss's ``*_blocks`` / ``*_scales``.

Nothing here imports :mod:`quantport.export`, compressed-tensors or a model: the loader reads these
tables without the writers.
"""
