"""Numeric formats: pure tensor functions, their frozen descriptors and their scheme codecs, one module per format.

* :mod:`.descriptors`: :class:`~.descriptors.NumericFormat` (typed capabilities: element, scale granularity,
  block size, scale type and dtype, activation side static/dynamic/none, ``needs_calibration``, stacks,
  input multiple, shared weight amax) and :class:`~.descriptors.ScaleConvention` where dialects differ;
* :mod:`.fp8`, :mod:`.nvfp4` (both global-scale conventions), :mod:`.mx` (MXFP8, MXFP4), :mod:`.integer`
  (INT8 / INT4, ModelOpt and compressed-tensors scale conventions): numerics and descriptors; each format's
  file also holds its scheme codecs (:mod:`.integer_ct` and :mod:`.integer_modelopt` for the integer ones),
  which :mod:`quantport.schemes` finds by discovery; :mod:`.int_packing`: the integer packings (re-exported
  by :mod:`.integer`);
* :mod:`.division`, :mod:`.finite`: arithmetic shared by the formats;
* :mod:`.pieces`: :class:`~.pieces.QuantizedPieces`, the neutral pieces a codec returns (codes, scale,
  global scale, zero point, shape, input scale), each with a typed :class:`~.pieces.Piece` role.

Nothing here knows a checkpoint dialect: the names, shapes on disk, ``quant_algo`` strings and
``QuantizationArgs`` rows of each dialect live in :mod:`quantport.dialects` (read by both the exporters in
:mod:`quantport.export.targets` and the loaders in :mod:`quantport.loader`). What adding a format touches
(3 files, measured) is in ``docs/extending.md``.
"""
