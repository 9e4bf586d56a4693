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


def test_modelopt_reader_table_inverts_the_writer_table():
    from quantport.export.targets.modelopt import MODELOPT_ALGOS
    from quantport.loader.modelopt import MODELOPT_ALGO_SCHEMES

    assert {algo.quant_algo: scheme for scheme, algo in MODELOPT_ALGOS.items()} == MODELOPT_ALGO_SCHEMES
