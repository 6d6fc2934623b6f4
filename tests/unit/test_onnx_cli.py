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


# ---- bad command lines: one ``bwta: ...`` line on stderr and exit code 2, never a traceback ----------


def tiny_model(tmp_path, name="m.onnx"):
    """A float ONNX file that imports: y = relu(x @ w), x of shape (batch, 4)."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], [w])
    path = tmp_path / name
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    return str(path)


def run_cli(capsys, *argv):
    """``bwta argv`` in this process: (exit code, stderr lines).  An exception (a traceback on the
    real command line) fails the test."""
    from bwta_compiler.cli import main

    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, [line for line in err.splitlines() if line.strip()]


def one_error_line(capsys, *argv):
    rc, lines = run_cli(capsys, *argv)
    assert rc == 2, (rc, lines)
    assert len(lines) == 1 and lines[0].startswith("bwta: "), lines
    return lines[0]


@pytest.mark.parametrize("command", ["compile", "bench"])
def test_unknown_option_name(tmp_path, capsys, command):
    line = one_error_line(capsys, command, tiny_model(tmp_path), "-o", "badoption=1")
    assert "'badoption'" in line and "valid options" in line and "fallback" in line


@pytest.mark.parametrize("command", ["compile", "bench"])
def test_bad_option_value(tmp_path, capsys, command):
    line = one_error_line(capsys, command, tiny_model(tmp_path), "-o", "fallback=wrong")
    assert "'fallback'" in line and "'wrong'" in line and "eager" in line


def test_option_without_value(tmp_path, capsys):
    line = one_error_line(capsys, "compile", tiny_model(tmp_path), "-o", "strict")
    assert "NAME=VALUE" in line and "'strict'" in line


def test_options_are_checked_by_the_config_module():
    from bwta_compiler.onnx.cli import CliError, _options

    args = parser().parse_args(["compile", "m.onnx", "-o", "num_threads=many"])
    with pytest.raises(CliError, match="num_threads"):
        _options(args)


@pytest.mark.parametrize("command", ["compile", "bench"])
@pytest.mark.parametrize(("flag", "value"), [("--batch", "-1"), ("--batch", "0"), ("--seq", "0"), ("--seq", "-3")])
def test_batch_and_seq_must_be_positive(tmp_path, capsys, command, flag, value):
    line = one_error_line(capsys, command, tiny_model(tmp_path), flag, value)
    assert flag in line and value in line and "positive" in line


@pytest.mark.parametrize(("flag", "value", "word"), [("--iters", "0", "positive"), ("--iters", "-2", "positive"),
                                                     ("--warmup", "-1", "non-negative")])
def test_bench_iterations(tmp_path, capsys, flag, value, word):
    line = one_error_line(capsys, "bench", tiny_model(tmp_path), flag, value)
    assert flag in line and value in line and word in line


def test_bench_missing_float_model(tmp_path, capsys):
    missing = tmp_path / "missing.onnx"
    rc, lines = run_cli(capsys, "bench", tiny_model(tmp_path), "--float-model", missing, "--iters", "1",
                        "--target", "cpu")
    # The progress lines come first; the error is the last line and the only ``bwta:`` line.
    assert rc == 2, lines
    assert [line for line in lines if line.startswith("bwta")] == [lines[-1]], lines
    assert str(missing) in lines[-1] and "no such file" in lines[-1]


def test_cache_dir_is_a_regular_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    for action in ("list", "size", "clear"):
        line = one_error_line(capsys, "cache", "--dir", f, action)
        assert str(f) in line and "not a directory" in line
    assert f.read_text() == "x"


def test_cache_dir_os_error(tmp_path, capsys):
    bad = tmp_path / ("x" * 300)  # ENAMETOOLONG, even for root
    for action in ("list", "size", "clear"):
        line = one_error_line(capsys, "cache", "--dir", bad, action)
        assert str(bad) in line and "too long" in line


def test_cache_dir_permission_denied(tmp_path, capsys, monkeypatch):
    from bwta_compiler.runtime.cache import KernelCache

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self.root))

    monkeypatch.setattr(KernelCache, "entries", denied)
    line = one_error_line(capsys, "cache", "--dir", tmp_path, "list")
    assert "Permission denied" in line and str(tmp_path) in line


def test_cache_missing_dir_still_lists_nothing(tmp_path, capsys):
    rc, _ = run_cli(capsys, "cache", "--dir", tmp_path / "none", "list")
    assert rc == 0
