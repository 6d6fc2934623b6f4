"""The ONNX subcommand parsers and import lightness (no onnx import until a command runs)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest


def test_importing_the_frontend_does_not_import_onnx():
    code = ("import sys, bwta_compiler, bwta_compiler.onnx, bwta_compiler.onnx.cli; "
            "assert 'onnx' not in sys.modules and 'onnxscript' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def parser():
    from bwta_compiler.onnx.cli import add_bench_parser, add_compile_parser

    p = argparse.ArgumentParser(prog="bwta")
    sub = p.add_subparsers(dest="command", required=True)
    add_compile_parser(sub)
    add_bench_parser(sub)
    return p


def test_compile_arguments():
    args = parser().parse_args(["compile", "m.onnx", "--target", "cuda", "--dump", "/tmp/d", "-o", "strict=1"])
    assert (args.model, args.target, args.dump, args.option) == ("m.onnx", "cuda", "/tmp/d", ["strict=1"])
    from bwta_compiler.onnx.cli import _options, run_compile
    assert args.func is run_compile
    assert _options(args, debug_dir=args.dump) == {"strict": "1", "target": "cuda", "debug_dir": "/tmp/d"}


def test_bench_arguments_and_help(capsys):
    args = parser().parse_args(["bench", "m.onnx", "--iters", "5", "--seq", "64"])
    assert (args.iters, args.seq, args.target) == (5, 64, "auto")
    with pytest.raises(SystemExit):
        parser().parse_args(["compile", "--help"])
    text = capsys.readouterr().out
    assert "--target {auto,cpu,cuda}" in text and "--dump DIR" in text and "example: bwta compile" in text


def test_setup_functions_fit_the_cli_table():
    from bwta_compiler.onnx.cli import setup_bench, setup_compile

    for setup in (setup_compile, setup_bench):
        p = argparse.ArgumentParser()
        setup(p)
        assert p.parse_args(["x.onnx"]).func is not None
