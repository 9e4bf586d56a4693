"""The loader reads checkpoints without the exporter or the calibrator."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("quantport.export", "quantport.modules.quant_experts", "quantport.modules.expert_calibration")


def test_importing_the_loader_imports_neither_export_nor_calibration():
    probe = "import sys, quantport.loader; print(' '.join(m for m in sys.modules if m.startswith('quantport.')))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(result.stdout.split())
    assert "quantport.loader" in loaded
    for module in FORBIDDEN:
        assert not any(m == module or m.startswith(module + ".") for m in loaded), module
    assert not any(m.startswith("quantport.calibrate") for m in loaded)


def test_modelopt_reader_and_writer_share_one_vocabulary():
    from quantport.dialects import modelopt as vocabulary
    from quantport.export.targets import modelopt as writer
    from quantport.loader import modelopt as reader

    assert writer.MODELOPT_ALGOS is vocabulary.MODELOPT_ALGOS
    assert dict(vocabulary.ALGO_SCHEMES) == {a.quant_algo: s for s, a in vocabulary.MODELOPT_ALGOS.items()}
    assert len(vocabulary.ALGO_SCHEMES) == len(vocabulary.MODELOPT_ALGOS) == 8
    for scheme, algo in vocabulary.MODELOPT_ALGOS.items():
        assert reader.codec_for_algo(algo.quant_algo.lower()).scheme is scheme


def test_compressed_tensors_reader_table_is_derived_from_the_writer_rows():
    from quantport.dialects.compressed_tensors import CT_SCHEMES
    from quantport.export.targets import compressed_tensors as writer
    from quantport.loader.compressed_tensors import CT_WEIGHT_SCHEMES

    assert writer.CT_SCHEMES is CT_SCHEMES
    read = [s for by_inputs in CT_WEIGHT_SCHEMES.values() for s in by_inputs.values()]
    assert sorted(read) == sorted(CT_SCHEMES) and len(read) == 11
