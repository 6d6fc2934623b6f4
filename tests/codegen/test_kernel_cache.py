"""The content-addressed kernel cache: hits, keys, corruption, concurrency, LRU, permissions, CLI."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from bwta_compiler.runtime import compile_cpu, cpu
from bwta_compiler.runtime.cache import MANIFEST, CacheKey, KernelCache

from bwta_compiler import config
from bwta_compiler.kernels import GemmParams

needs_cc = pytest.mark.skipif(not compile_cpu.available(), reason="needs a C compiler")

PARAMS = GemmParams(variant="bt", a_act="ternary", b_act="binary", k=64, kw=2, n=4, isa="portable", op="linear")


def _key(**kw: str) -> CacheKey:
    base = dict(target="cpu", source_sha256="s" * 64, options="-O3", arch="x", compiler="cc 12", bwta="b" * 64)
    base.update(kw)
    return CacheKey(**base)


def _fake_build(payload: bytes = b"\x7fELF" + b"x" * 100):
    calls = []

    def build(source: Path, artifact: Path) -> str:
        calls.append(source)
        artifact.write_bytes(payload)
        return "built ok\n"

    build.calls = calls
    return build


def test_key_digest_changes_with_every_field() -> None:
    base = _key()
    digests = {base.digest()}
    for field in dataclasses.fields(CacheKey):
        digests.add(dataclasses.replace(base, **{field.name: "changed"}).digest())
    assert len(digests) == 1 + len(dataclasses.fields(CacheKey))
    assert any(line.startswith("options: ") for line in base.debug_lines())


def test_memory_then_disk_hit(tmp_path) -> None:
    build = _fake_build()
    entry = KernelCache(tmp_path).lookup_or_build(_key(), "int x;", "k.so", build)
    assert not entry.hit and len(build.calls) == 1
    assert {"k.so", "k.c", "key.txt", "compile.log", MANIFEST} <= {p.name for p in entry.directory.iterdir()}
    cache2 = KernelCache(tmp_path)  # a fresh process: nothing in memory
    assert cache2.lookup_or_build(_key(), "int x;", "k.so", build).hit
    assert cache2.lookup_or_build(_key(), "int x;", "k.so", build).hit
    assert len(build.calls) == 1
    assert entry.directory.parent.name == _key().digest()[:2]


def test_root_is_owner_only(tmp_path) -> None:
    root = tmp_path / "fresh" / "cache"
    KernelCache(root).lookup_or_build(_key(), "src", "k.so", _fake_build())
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest"])
def test_corrupted_entry_is_rebuilt(tmp_path, damage: str) -> None:
    build = _fake_build()
    entry = KernelCache(tmp_path).lookup_or_build(_key(), "src", "k.so", build)
    if damage == "truncate":
        entry.artifact_path.write_bytes(entry.artifact_path.read_bytes()[:10])
    elif damage == "flip":
        data = bytearray(entry.artifact_path.read_bytes())
        data[5] ^= 0xFF
        entry.artifact_path.write_bytes(bytes(data))
    else:
        (entry.directory / MANIFEST).unlink()
    again = KernelCache(tmp_path).lookup_or_build(_key(), "src", "k.so", build)
    assert not again.hit and len(build.calls) == 2
    manifest = json.loads((again.directory / MANIFEST).read_text())
    assert manifest["size"] == again.artifact_path.stat().st_size


def test_build_failure_leaves_no_valid_entry(tmp_path) -> None:
    def failing(source: Path, artifact: Path) -> str:
        artifact.write_bytes(b"half")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError):
        KernelCache(tmp_path).lookup_or_build(_key(), "src", "k.so", failing)
    build = _fake_build()
    assert not KernelCache(tmp_path).lookup_or_build(_key(), "src", "k.so", build).hit


def test_lru_eviction_keeps_recent_entries(tmp_path) -> None:
    cache = KernelCache(tmp_path, size_limit_mb=1)
    big = _fake_build(b"x" * (400 << 10))
    keys = [_key(source_sha256=str(i) * 64) for i in range(4)]
    cache.lookup_or_build(keys[0], "a", "k.so", big)
    cache.lookup_or_build(keys[1], "b", "k.so", big)
    os.utime(cache.entry_dir(keys[0]) / MANIFEST, (1, 1))  # make entry 0 the least recently used
    os.utime(cache.entry_dir(keys[1]) / MANIFEST, (2, 2))
    KernelCache(tmp_path, size_limit_mb=1).lookup_or_build(keys[1], "b", "k.so", big)  # touch 1 on use
    cache.lookup_or_build(keys[2], "c", "k.so", big)  # 1.2 MB > 1 MB: evict the oldest
    assert not (cache.entry_dir(keys[0]) / MANIFEST).exists()
    assert (cache.entry_dir(keys[1]) / MANIFEST).exists() and (cache.entry_dir(keys[2]) / MANIFEST).exists()
    assert cache.size_bytes() <= 1 << 20


def test_disabled_cache_always_builds(tmp_path) -> None:
    build = _fake_build()
    cache = KernelCache(tmp_path / "unused", enabled=False)
    assert not cache.lookup_or_build(_key(), "s", "k.so", build).hit
    assert not (tmp_path / "unused").exists()


_CONCURRENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from bwta_compiler.runtime.cache import CacheKey, KernelCache
    def build(src, art):
        time.sleep(0.5)  # both processes are inside lookup_or_build at once
        art.write_bytes(b"artifact from " + sys.argv[2].encode())
        return "log"
    key = CacheKey("cpu", "c" * 64, "-O3", "x", "cc", "b" * 64)
    e = KernelCache(sys.argv[1]).lookup_or_build(key, "src", "k.so", build)
    print("HIT" if e.hit else "BUILT", e.artifact_path.read_bytes().decode())
""")


def test_two_processes_building_at_once_both_succeed(tmp_path) -> None:
    script = tmp_path / "race.py"
    script.write_text(_CONCURRENT)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "c"), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = sorted(o[0].split()[0] for o in outs)
    assert results == ["BUILT", "HIT"], outs
    assert outs[0][0].split(" ", 1)[1] == outs[1][0].split(" ", 1)[1]  # both see the same artifact


@needs_cc
def test_load_kernel_hits_and_key_tracks_source_and_options(tmp_path) -> None:
    cfg = config.resolve({"cache_dir": str(tmp_path / "kc")})
    first = cpu.load_kernel(PARAMS, cfg)
    assert not first.cache_hit and first.artifact_path.exists()
    again = cpu.load_kernel(PARAMS, cfg)
    assert again.cache_hit and again.artifact_path == first.artifact_path
    other_tile = cpu.load_kernel(dataclasses.replace(PARAMS, tile_n=3), cfg)  # other source
    assert not other_tile.cache_hit and other_tile.artifact_path != first.artifact_path
    other_isa = cpu.load_kernel(dataclasses.replace(PARAMS, isa="avx2"), cfg) if compile_cpu.isa_supported("avx2") \
        else None
    if other_isa is not None:  # other options (ISA flags) and source
        assert dict(line.split(": ", 1) for line in other_isa.key_lines)["options"] != \
            dict(line.split(": ", 1) for line in first.key_lines)["options"]
    forced = cpu.load_kernel(PARAMS, cfg.replace(always_compile=True))
    assert not forced.cache_hit


def _bwta(*args: str, cache_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, BWTA_CACHE_DIR=str(cache_dir))
    return subprocess.run([sys.executable, "-m", "bwta_compiler.cli", *args], check=False, capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_cache_list_size_clear(tmp_path) -> None:
    root = tmp_path / "cli-cache"
    cache = KernelCache(root)
    cache.lookup_or_build(_key(), "src", "bt_n4_k64_abcd.so", _fake_build())
    cache.lookup_or_build(_key(source_sha256="t" * 64), "src2", "tt_qbmm_k64_ef01.so", _fake_build())
    listed = _bwta("cache", "list", cache_dir=root)
    assert listed.returncode == 0, listed.stderr
    assert "bt_n4_k64_abcd.so" in listed.stdout and "2 entries" in listed.stdout
    size = _bwta("cache", "size", cache_dir=root)
    assert size.returncode == 0 and str(cache.size_bytes()) in size.stdout
    cleared = _bwta("cache", "clear", cache_dir=root)
    assert cleared.returncode == 0 and "removed 2 entries" in cleared.stdout
    assert "0 entries" in _bwta("cache", "list", cache_dir=root).stdout


# ---- an artifact that fails to load, an unusable cache dir, BWTA_CACHE=0 leaving no temp dirs ----

def _cpu_choice():
    from bwta_compiler.kernels import KernelChoice

    return KernelChoice(variant="bt", target="cpu", template="gemm", params=PARAMS)


def _linear_check(kernel) -> None:
    import torch

    from bwta_compiler import formats, reference

    torch.manual_seed(0)
    x, s, w = torch.randn(5, PARAMS.k), torch.tensor(0.7), formats.pack_binary_codes(torch.randn(PARAMS.n, PARAMS.k))
    scale = torch.rand(PARAMS.n) + 0.1
    want = reference.linear_reference(x, s, None, "ternary", w, PARAMS.k, scale, None, None, 64)
    assert torch.equal(kernel(x, s, None, w, scale, None, None), want)


def _corrupt_with_valid_manifest(directory: Path) -> Path:
    """Garbage in place of the .so, with a manifest that matches it (passes the cache's own check)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    artifact = directory / manifest["artifact"]
    artifact.write_bytes(b"not an ELF file " * 300)
    data = artifact.read_bytes()
    manifest.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return artifact


@needs_cc
def test_artifact_that_fails_to_load_is_rebuilt(tmp_path) -> None:
    from bwta_compiler import runtime_bridge

    # Populate cache A, then copy it to B: B's .so was never dlopen'ed in this process (the loader
    # would hand back the already loaded object by path without reading the corrupted file).
    cfg_a = config.resolve({"cache_dir": str(tmp_path / "a"), "cpu_isa": "portable"})
    first, why = runtime_bridge.load(_cpu_choice(), cfg_a)
    assert first is not None, why
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cfg_b = cfg_a.replace(cache_dir=str(tmp_path / "b"))
    entry_dir = tmp_path / "b" / first.artifact_path.relative_to(tmp_path / "a").parent
    artifact = _corrupt_with_valid_manifest(entry_dir)
    kernel, why = runtime_bridge.load(_cpu_choice(), cfg_b)
    assert kernel is not None, why
    assert kernel.artifact_path == artifact and not kernel.cache_hit  # rebuilt in place
    assert artifact.read_bytes()[:4] == b"\x7fELF"
    manifest = json.loads((entry_dir / MANIFEST).read_text())
    assert manifest["sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    _linear_check(kernel)


@needs_cc
def test_kernel_that_never_loads_falls_back_with_a_reason(tmp_path, monkeypatch) -> None:
    from bwta_compiler import runtime_bridge

    builds = []

    def bad_make_so(source: Path, artifact: Path, options) -> str:
        builds.append(source)
        artifact.write_bytes(b"garbage, not a shared object")
        return "log"

    monkeypatch.setattr(compile_cpu, "make_so", bad_make_so)
    cfg = config.resolve({"cache_dir": str(tmp_path / "c"), "cpu_isa": "portable"})
    kernel, why = runtime_bridge.load(_cpu_choice(), cfg)
    assert kernel is None and "could not be loaded" in why and "OSError" in why
    assert len(builds) == 2  # built, then rebuilt once


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_unusable_cache_dir_builds_uncached_with_one_warning(tmp_path, caplog, where: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    root = afile if where == "file" else afile / "sub" / "cache"
    cache = KernelCache(root)
    build = _fake_build()
    with caplog.at_level("WARNING", logger="bwta_compiler.runtime.cache"):
        e1 = cache.lookup_or_build(_key(), "src", "k.so", build)
        e2 = cache.lookup_or_build(_key(source_sha256="t" * 64), "src2", "k.so", build)
    assert not e1.hit and not e2.hit and e1.artifact_path.read_bytes() == e2.artifact_path.read_bytes()
    assert not str(e1.directory).startswith(str(afile))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(root) in warnings[0].getMessage()
    assert "uncached" in warnings[0].getMessage()
    assert afile.read_text() == "x"


@needs_cc
def test_cache_dir_that_is_a_file_still_runs_kernels(tmp_path, caplog) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    cfg = config.resolve({"cache_dir": str(afile), "cpu_isa": "portable"})
    with caplog.at_level("WARNING", logger="bwta_compiler.runtime.cache"):
        kernel = cpu.load_kernel(PARAMS, cfg)
    _linear_check(kernel)
    assert any(str(afile) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def _nocache_dirs(where: Path) -> list[Path]:
    return sorted(where.glob("bwta-nocache-*"))


def test_disabled_cache_leaves_no_temp_dirs(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cache = KernelCache(tmp_path / "unused", enabled=False)
    e1 = cache.lookup_or_build(_key(), "s", "k.so", _fake_build())
    e2 = cache.lookup_or_build(_key(source_sha256="t" * 64), "s2", "k.so", _fake_build())
    assert e1.artifact_path.exists() and e2.artifact_path.exists()
    assert len(_nocache_dirs(tmp_path)) <= 1  # one per cache object, not one per kernel
    del cache, e1, e2
    gc.collect()
    assert _nocache_dirs(tmp_path) == []


_NOCACHE = textwrap.dedent("""
    import dataclasses, sys
    from bwta_compiler import config
    from bwta_compiler.kernels import GemmParams
    from bwta_compiler.runtime import cpu
    p = GemmParams(variant="bt", a_act="ternary", b_act="binary", k=64, kw=2, n=4, isa="portable", op="linear")
    cfg = config.resolve({"cache": False})
    for params in (p, dataclasses.replace(p, tile_n=3)):
        assert cpu.load_kernel(params, cfg).artifact_path.exists()
    print("OK")
""")


@needs_cc
def test_disabled_cache_process_leaves_no_temp_dirs(tmp_path) -> None:
    script = tmp_path / "nocache.py"
    script.write_text(_NOCACHE)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), BWTA_CACHE="0")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr
    assert _nocache_dirs(tmp) == []
