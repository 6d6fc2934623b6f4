"""Importing bwta_compiler never imports cuda-python or onnx (beyond what torch itself loads)."""

import subprocess
import sys
import textwrap


def test_import_is_light():
    code = textwrap.dedent("""
        import sys, torch
        before = set(sys.modules)
        import bwta_compiler, bwta_compiler.models
        new = set(sys.modules) - before
        bad = sorted(m for m in new if m.split('.')[0] in ('cuda', 'onnx', 'onnxscript', 'transformers'))
        print('BAD', bad)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "BAD []" in out.stdout, out.stdout
