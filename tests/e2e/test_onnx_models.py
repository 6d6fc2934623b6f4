"""Real ONNX files of the example encoder and decoder (float and BWTA-quantized), exported with
torch.onnx.export and imported back: float outputs equal torch and onnx.reference within 1e-5
relative; BWTA low-bit parts equal bit for bit; dynamic dims stay dynamic."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
import torch
from onnx.reference import ReferenceEvaluator

import bwta_compiler as bc
from bwta_compiler.models import Decoder, DecoderConfig, Encoder, EncoderConfig
from bwta_compiler.modules import BWTALinear
from bwta_compiler.onnx import bwta_op_counts, export, import_model

pytestmark = pytest.mark.slow
RTOL = 1e-5


def inputs(kind: str, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (batch, seq), generator=g)
    if kind == "dec":
        return (ids,)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - 2:] = 0
    return ids, mask


def flat_outputs(kind: str, out):
    if kind == "dec":
        logits, cache = out
        return [logits] + [t for kv in cache for t in kv]
    return [out]


def rel_err(a: torch.Tensor, b) -> float:
    b = torch.as_tensor(np.asarray(b))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig.tiny()).eval()
    dec = Decoder(DecoderConfig.tiny()).eval()
    qenc, qdec = bc.quantize(enc), bc.quantize(dec)
    with torch.no_grad():        # calibrate the quantizers once (LSQ init) so export sees the same scales
        qenc(*inputs("enc", 2, 8))
        qdec(*inputs("dec", 2, 8))
    return {"enc": enc, "dec": dec, "qenc": qenc, "qdec": qdec}


def torch_export(model, kind, path, opset, dynamo=True, external_data=False):
    args = inputs(kind, 2, 8)
    names = ["input_ids", "attention_mask"][: len(args)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
            torch.onnx.export(model, args, str(path), opset_version=opset, external_data=external_data,
                              dynamic_shapes={n: {0: b, 1: s} for n in names})
        else:
            torch.onnx.export(model, args, str(path), opset_version=opset, dynamo=False, input_names=names,
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
    return path


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    out = {
        ("enc", 17, "dynamo"): torch_export(models["enc"], "enc", d / "enc17.onnx", 17),
        ("enc", 18, "dynamo"): torch_export(models["enc"], "enc", d / "enc18.onnx", 18),
        ("dec", 18, "dynamo"): torch_export(models["dec"], "dec", d / "dec18.onnx", 18),
        # The dynamo exporter cannot down-convert the decoder to opset 17 (onnx's version converter
        # fails on its dynamic Unsqueeze axes); the legacy TorchScript exporter writes opset 17.
        ("dec", 17, "legacy"): torch_export(models["dec"], "dec", d / "dec17_legacy.onnx", 17, dynamo=False),
        ("enc", 17, "legacy"): torch_export(models["enc"], "enc", d / "enc17_legacy.onnx", 17, dynamo=False),
    }
    ext = d / "external"
    ext.mkdir()
    out[("enc", 18, "external")] = torch_export(models["enc"], "enc", ext / "enc_ext.onnx", 18, external_data=True)
    return out


FLOAT_CASES = [("enc", 17, "dynamo"), ("enc", 18, "dynamo"), ("dec", 18, "dynamo"), ("dec", 17, "legacy"),
               ("enc", 17, "legacy"), ("enc", 18, "external")]


@pytest.mark.parametrize("case", FLOAT_CASES, ids=["-".join(map(str, c)) for c in FLOAT_CASES])
def test_float_model_roundtrip(models, files, case):
    kind, opset, _how = case
    path = files[case]
    proto = onnx.load(str(path), load_external_data=False)
    assert {o.domain: o.version for o in proto.opset_import}.get("", None) == opset
    gm = import_model(path)
    ref_eval = ReferenceEvaluator(str(path))
    for batch, seq in ((2, 8), (3, 5)):           # dynamic batch and sequence
        args = inputs(kind, batch, seq, seed=seq)
        with torch.no_grad():
            expected = flat_outputs(kind, models[kind](*args))
            got = gm(*args)
        got = list(got) if isinstance(got, tuple) else [got]
        assert len(got) == len(expected)
        ref = ref_eval.run(None, {n: a.numpy() for n, a in zip(gm.onnx_input_names, args)})
        for g, e, r in zip(got, expected, ref):
            assert g.shape == e.shape
            assert rel_err(g, e) <= RTOL
            assert rel_err(g, r) <= RTOL


def test_external_data_is_resolved_relative_to_the_model(files, tmp_path, models):
    src = files[("enc", 18, "external")]
    data = [p for p in src.parent.iterdir() if p.suffix == ".data"]
    assert data, "the exporter should have written an external data file"
    dst = tmp_path / "moved"
    shutil.copytree(src.parent, dst)
    gm = import_model(dst / src.name)          # found next to the moved model, not via the cwd
    args = inputs("enc", 2, 6)
    with torch.no_grad():
        assert rel_err(gm(*args), models["enc"](*args)) <= RTOL


def test_dynamo_captures_one_graph(files):
    gm = import_model(files[("dec", 18, "dynamo")])
    torch._dynamo.reset()
    explain = torch._dynamo.explain(gm)(*inputs("dec", 2, 8))
    assert explain.graph_count == 1 and explain.graph_break_count == 0
    from torch._dynamo.testing import CompileCounter
    cnt = CompileCounter()
    compiled = torch.compile(gm, backend=cnt, dynamic=True)
    with torch.no_grad():
        for b, t in ((2, 8), (3, 5), (2, 11)):
            args = inputs("dec", b, t)
            for x, y in zip(compiled(*args), gm(*args)):
                torch.testing.assert_close(x, y)
    assert cnt.frame_count == 1


# ---- BWTA models through bwta_compiler.onnx.export -----------------------------------------------


@pytest.fixture(scope="module")
def bwta_files(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("bwta")
    out = {}
    for kind, opset in (("enc", 17), ("enc", 18), ("dec", 18)):
        out[(kind, opset)] = d / f"q{kind}{opset}.onnx"
        export(models["q" + kind], inputs(kind, 2, 8), out[(kind, opset)], opset_version=opset)
    out[("enc", "external")] = d / "qenc_ext.onnx"
    export(models["qenc"], inputs("enc", 2, 8), out[("enc", "external")], external_data=True)
    return out


def _linear_outputs_torch(model, args) -> list[torch.Tensor]:
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
             for m in model.modules() if isinstance(m, BWTALinear)]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _linear_outputs_fx(gm, args, fused: bool) -> list[torch.Tensor]:
    """Outputs of every low-bit linear in the imported graph (bwta::linear, or the epilogue of the
    unfused form: the node that consumes F.linear(codes, unpack_binary(Wp)))."""
    outs = []
    targets = set()
    for n in gm.graph.nodes:
        if fused and n.target is torch.ops.bwta.linear.default:
            targets.add(n)
        if not fused and n.target is torch.nn.functional.linear and any(
                a.target is torch.ops.bwta.unpack_binary.default for a in n.all_input_nodes):
            (mul,) = n.users
            users = list(mul.users)
            bias_add = len(users) == 1 and users[0].target is torch.add and users[0].args[1].op == "get_attr"
            targets.add(users[0] if bias_add else mul)

    class Tap(torch.fx.Interpreter):
        def run_node(self, node):
            r = super().run_node(node)
            if node in targets:
                outs.append(r.detach().clone())
            return r

    with torch.no_grad():
        Tap(gm).run(*args)
    return outs


@pytest.mark.parametrize("case", [("enc", 17), ("enc", 18), ("dec", 18), ("enc", "external")],
                         ids=["qenc17", "qenc18", "qdec18", "qenc-external"])
def test_bwta_export_checker_and_roundtrip(models, bwta_files, case):
    kind = case[0]
    path = bwta_files[case]
    proto = onnx.load(str(path), load_external_data=False)
    from bwta_compiler.onnx import schemas
    schemas.register()
    onnx.checker.check_model(str(path))
    counts = bwta_op_counts(proto)
    n_linear = sum(isinstance(m, BWTALinear) for m in models["q" + kind].modules())
    assert counts["Linear"] == n_linear and counts["TernaryCode"] == 6 and counts["BoolCode"] == 2
    from bwta_compiler.onnx.reference_ops import evaluator
    ref_eval = evaluator(str(path))
    wp = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT32]
    assert len(wp) >= n_linear         # packed binary weights stored as int32 initializers
    for fused in (False, True):
        gm = import_model(path, fused_linear=fused)
        for batch, seq in ((2, 8), (3, 5)):
            args = inputs(kind, batch, seq, seed=seq)
            with torch.no_grad():
                expected = flat_outputs(kind, models["q" + kind](*args))
                got = gm(*args)
            got = list(got) if isinstance(got, tuple) else [got]
            for g, e in zip(got, expected):
                assert rel_err(g, e) <= RTOL
            # Low-bit parts bit for bit: every BWTA linear output of the torch model appears exactly.
            t_outs = _linear_outputs_torch(models["q" + kind], args)
            f_outs = _linear_outputs_fx(gm, args, fused)
            assert len(f_outs) == len(t_outs) == n_linear
            for f in f_outs:
                assert any(f.shape == t.shape and torch.equal(f, t) for t in t_outs)
            if kind == "dec":          # V caches are BWTA linear outputs reshaped: exact
                for g, e in zip(got[2::2], expected[2::2]):
                    assert torch.equal(g, e)
            if not fused:              # the NumPy ai.bwta ops: an oracle independent of torch
                ref = ref_eval.run(None, {n: a.numpy() for n, a in zip(gm.onnx_input_names, args)})
                for g, r in zip(got, ref):
                    assert rel_err(g, r) <= RTOL
                if kind == "dec":
                    for g, r in zip(got[2::2], ref[2::2]):
                        np.testing.assert_array_equal(g.numpy(), r)


def test_unpacked_export_keeps_binary_code(models, tmp_path):
    path = tmp_path / "unpacked.onnx"
    proto = export(models["qenc"], inputs("enc", 2, 8), path, packed=False)
    assert bwta_op_counts(proto)["BinaryCode"] == 12
    gm = import_model(path)
    args = inputs("enc", 2, 6)
    with torch.no_grad():
        assert rel_err(gm(*args), models["qenc"](*args)) <= RTOL


def test_quantize_on_import_uses_quantize_rules(models, files):
    gm = import_model(files[("dec", 17, "legacy")], quantize=True)
    names = {n for n, m in gm.named_modules() if isinstance(m, BWTALinear)}
    assert "layers.0.attention.q_proj" in names and "layers.1.down_proj" in names
    assert "lm_head" not in names          # kept float by the default rule
    assert any("lm_head" in line for line in bc.report_lines(gm))
    # Linear layers only: the imported float model quantized on import equals the torch model
    # quantized in torch (same weights, same LSQ initialisation from the same first batch).
    cfg = bc.QuantConfig(attention=False)
    gm2 = import_model(files[("enc", 18, "dynamo")], quantize=cfg)
    q = bc.quantize(models["enc"], cfg)
    args = inputs("enc", 2, 8)
    with torch.no_grad():
        assert rel_err(gm2(*args), q(*args)) <= RTOL
    gm3 = import_model(files[("enc", 18, "dynamo")], quantize=True)
    entries = gm3.bwta_report
    assert sum(e.kind == "linear" and e.choice == "bwta" for e in entries) == 12
    with torch.no_grad():
        assert torch.isfinite(gm3(*args)).all()


def test_compile_onnx_with_bwta_backend(bwta_files):
    if "bwta" not in torch._dynamo.list_backends():
        pytest.skip("the bwta backend is not registered")
    from bwta_compiler.onnx import compile_onnx
    from bwta_compiler.report import last_report, reset_reports

    path = bwta_files[("enc", 18)]
    gm = import_model(path)
    reset_reports()
    torch._dynamo.reset()
    compiled = compile_onnx(path, target="cpu")
    for seq in (8, 12):
        args = inputs("enc", 2, seq, seed=seq)
        with torch.no_grad():
            assert rel_err(compiled(*args), gm(*args)) <= 1e-4
    rep = last_report()
    assert rep.total > 0 and rep.lowbit == rep.total, str(rep)


def test_cli_compile_and_bench(bwta_files, capsys):
    if "bwta" not in torch._dynamo.list_backends():
        pytest.skip("the bwta backend is not registered")
    import argparse

    from bwta_compiler.onnx.cli import add_bench_parser, add_compile_parser

    parser = argparse.ArgumentParser(prog="bwta")
    sub = parser.add_subparsers(dest="command", required=True)
    add_compile_parser(sub)
    add_bench_parser(sub)
    path = str(bwta_files[("enc", 18)])
    args = parser.parse_args(["compile", path, "--target", "cpu", "--seq", "8"])
    torch._dynamo.reset()
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "MatMuls run in low bit" in out.out and "[1/3] importing" in out.err
    assert "linear_bt" in out.out          # the kernel table
    args = parser.parse_args(["bench", path, "--target", "cpu", "--seq", "8", "--iters", "2", "--warmup", "1"])
    torch._dynamo.reset()
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "speedup" in out.out and "float (inductor)" in out.out


def test_cli_reports_import_errors(tmp_path, capsys):
    import argparse

    from bwta_compiler.onnx.cli import add_compile_parser

    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    parser = argparse.ArgumentParser(prog="bwta")
    add_compile_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compile", str(bad)])
    assert args.func(args) == 2
    assert "bad.onnx" in capsys.readouterr().err
