"""Numeric formats: pure tensor functions, one module per format, and their frozen descriptors.

* :mod:`.descriptors`: :class:`~.descriptors.NumericFormat` (typed capabilities: element, scale granularity,
  block size, scale type and dtype, activation side static/dynamic/none, ``needs_calibration``, stacks,
  input multiple, shared weight amax) and :class:`~.descriptors.ScaleConvention` where dialects differ;
* :mod:`.fp8`, :mod:`.nvfp4` (both global-scale conventions), :mod:`.mx` (MXFP8, MXFP4), :mod:`.integer`
  (INT8 / INT4, ModelOpt and compressed-tensors scale conventions): numerics and descriptors;
  :mod:`.int_packing`: the integer packings (re-exported by :mod:`.integer`);
* :mod:`.division`, :mod:`.finite`: arithmetic shared by the formats.

Nothing here knows a checkpoint dialect: tensor names, ``quant_algo`` strings and config blocks live in
:mod:`quantport.export.targets`.

Adding a format / a dialect
---------------------------
Measured on this tree (files a change touches, tests included):

A numeric format, 7 files (8 when both dialects store it):

1. ``formats/<format>.py``: quantize / dequantize / pack functions and its ``NumericFormat``;
2. ``schemes/<format>.py``: the codec (tensor specs, ``quantize_weight``, ``dequantize_weight``, activations)
   and ``register(...)``; 3. its import on the last line of ``schemes/__init__.py``;
4. ``recipes.py``: the ``LinearScheme`` member and its ``PRESETS`` row;
5. each dialect that stores it: a row in ``export/targets/modelopt.py`` (``MODELOPT_ALGOS``) and/or
   ``export/targets/ct_schemes.py`` (``CT_SCHEMES``);
6. the checker's expected tensors, ``check/specs.py``;
7. ``tests/formats/test_<format>.py``, decoding with an independent reader (``tests/formats/reference_decoders.py``).

A checkpoint dialect, 5 files:

1. ``export/targets/<dialect>.py``: names, shapes, config blocks, ``SCHEMES`` and the content builder;
2. ``export/targets/__init__.py``: its ``ExportFormat`` member and its ``TARGETS`` row (priority order);
3. a reader parser (``loader/``); 4. a checker contract (``check/``); 5. ``tests/export/test_<dialect>.py``.
"""
