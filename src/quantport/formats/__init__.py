"""Numeric formats: pure tensor functions, one module per format, and their frozen descriptors.

* :mod:`.descriptors`: :class:`~.descriptors.NumericFormat` (typed capabilities: element, scale granularity,
  block size, scale type and dtype, activation side static/dynamic/none, ``needs_calibration``, stacks,
  input multiple, shared weight amax) and :class:`~.descriptors.ScaleConvention` where dialects differ;
* :mod:`.fp8`, :mod:`.nvfp4` (both global-scale conventions), :mod:`.mx` (MXFP8, MXFP4), :mod:`.integer`
  (INT8 / INT4, ModelOpt and compressed-tensors scale conventions): numerics and descriptors;
  :mod:`.int_packing`: the integer packings (re-exported by :mod:`.integer`);
* :mod:`.division`, :mod:`.finite`: arithmetic shared by the formats;
* :mod:`.pieces`: :class:`~.pieces.QuantizedPieces`, the neutral pieces a codec returns (codes, scale,
  global scale, zero point, shape, input scale), each with a typed :class:`~.pieces.Piece` role.

Nothing here knows a checkpoint dialect: the names, shapes on disk, ``quant_algo`` strings and
``QuantizationArgs`` rows of each dialect live in :mod:`quantport.dialects` (read by both the exporters in
:mod:`quantport.export.targets` and the loaders in :mod:`quantport.loader`).

Adding a format / a dialect
---------------------------
Measured on this tree (files a change touches, tests included):

A numeric format stored in one dialect, 6 files (7 when both dialects store it; 7 and 8 before):

1. ``formats/<format>.py``: quantize / dequantize / pack functions and its ``NumericFormat``;
2. ``schemes/<format>.py``: the codec (piece specs, ``quantize_weight`` returning
   :class:`~.pieces.QuantizedPieces`, ``dequantize_weight``, activations) and ``register(...)``; the
   package imports every module of ``schemes/``, so no import line elsewhere;
3. ``recipes.py``: the ``LinearScheme`` member and its ``PRESETS`` row;
4. each dialect that stores it, one row: ``dialects/modelopt.py`` (``MODELOPT_ALGOS``, which the loader
   inverts) and/or ``dialects/compressed_tensors.py`` (``CT_SCHEMES``: tensor names follow from the row's
   format and strategy, the loader's lookup is derived from the rows);
5. the checker's expected tensors, ``check/specs.py``;
6. ``tests/formats/test_<format>.py``, decoding with an independent reader (``tests/formats/reference_decoders.py``).

Not yet at the target of 4: the codec is its own file (the formats stay pure functions, and kernels import
them), the checker keeps its own contract on purpose, and a ModelOpt ``quant_algo`` cannot be derived.

A checkpoint dialect, 6 files:

1. ``dialects/<dialect>.py``: its vocabulary (piece names and shapes, config strings), which export and
   load both read; 2. ``export/targets/<dialect>.py``: the tensor plan, config blocks, ``SCHEMES`` and the
   content builder; 3. ``export/targets/__init__.py``: its ``ExportFormat`` member and ``TARGETS`` row
   (priority order); 4. a reader (``loader/<dialect>.py``) naming pieces through the vocabulary;
   5. a checker contract (``check/``); 6. ``tests/export/test_<dialect>.py``.
"""
