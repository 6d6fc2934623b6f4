"""Content-addressed kernel cache shared by the CPU and CUDA targets.

Lookup order: an in-process dict, then disk, then build.  An entry lives in
``<root>/<digest[:2]>/<digest>/`` and holds the source, the artifact, ``key.txt`` (the key's
``debug_lines``), ``compile.log`` and ``manifest.json`` (artifact name, size and sha256).  The
manifest is written last, so an entry without a valid manifest, or whose artifact no longer
matches it (truncated, corrupted), is simply rebuilt.

Every file is written to a temp file in the same directory and moved with ``os.replace``, which
is atomic on POSIX, so readers never see a partial artifact.  A per-entry ``flock`` serialises
builders: when two processes compile the same kernel at once the second waits, finds the first
one's valid entry and uses it; both succeed.  The manifest's mtime is touched on every use and
the oldest entries are evicted when the cache outgrows its size limit (LRU).  The root is
created with owner-only permissions (0o700): artifacts are loaded as code.

A root that cannot be used (a regular file, a path under a file, a directory this user cannot
write) does not stop kernels from building: the cache warns once, naming the path and the reason,
and builds uncached from then on, as with ``BWTA_CACHE=0``.  Uncached builds go to one private
temp directory per cache object (``bwta-nocache-*``), removed when the cache is collected or the
process exits (a loaded shared object stays mapped after its file is gone).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

log = logging.getLogger("bwta_compiler.runtime.cache")

MANIFEST = "manifest.json"
KEY_FILE = "key.txt"
LOG_FILE = "compile.log"

BuildFn = Callable[[Path, Path], str]


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines a kernel binary, kept in one inspectable object."""

    target: str
    source_sha256: str
    options: str
    arch: str
    compiler: str
    bwta: str  # codegen.bwta_key(): templates + codegen + runtime code

    def digest(self) -> str:
        """sha256 over every field (name and value)."""
        h = hashlib.sha256()
        for f in fields(self):
            h.update(f"{f.name}={getattr(self, f.name)}\n".encode())
        return h.hexdigest()

    def debug_lines(self) -> list[str]:
        """One line per field: its value, and its hash where the value is long."""
        lines = []
        for f in fields(self):
            value = str(getattr(self, f.name))
            short = hashlib.sha256(value.encode()).hexdigest()[:16]
            lines.append(f"{f.name}: {value}" if len(value) <= 80 else f"{f.name}: sha256:{short} ({value[:60]}...)")
        lines.append(f"digest: {self.digest()}")
        return lines


@dataclass(frozen=True)
class CacheEntry:
    """A built kernel on disk (or in a temp dir when the cache is disabled)."""

    key: CacheKey
    directory: Path
    source_path: Path
    artifact_path: Path
    log: str
    hit: bool  # True when found in memory or on disk, False when built by this call


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory + os.replace (atomic on POSIX)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) and make it owner-only, whatever the umask."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


class KernelCache:
    """In-memory dict -> disk -> build.  ``enabled=False`` builds into a temp dir every time."""

    def __init__(self, root: str | os.PathLike, enabled: bool = True, size_limit_mb: int = 512) -> None:
        self.root = Path(root)
        self.enabled = enabled
        self.size_limit = int(size_limit_mb) * (1 << 20)
        self._memory: dict[str, CacheEntry] = {}
        self._lock = threading.Lock()
        self.unusable_reason: str | None = None  # set when the root cannot be used (builds go uncached)
        self._nocache_dir: Path | None = None  # the temp dir of uncached builds, created on first use

    # ---- lookup ----------------------------------------------------------------------------

    def entry_dir(self, key: CacheKey) -> Path:
        d = key.digest()
        return self.root / d[:2] / d

    def lookup_or_build(self, key: CacheKey, source: str, artifact_name: str, build: BuildFn,
                        force: bool = False) -> CacheEntry:
        """The entry for ``key``; ``build(source_path, artifact_path) -> log`` runs only on a miss
        (or always with ``force``, the ``always_compile`` flag)."""
        digest = key.digest()
        with self._lock:
            if not force and digest in self._memory:
                return self._mark_hit(self._memory[digest])
            entry = None
            if self.enabled and self.unusable_reason is None:
                entry = self._lookup_disk_or_build(key, source, artifact_name, build, force)
            if entry is None:
                entry = self._build_uncached(key, source, artifact_name, build)
            self._memory[digest] = entry
            return entry

    def _mark_hit(self, entry: CacheEntry) -> CacheEntry:
        return entry if entry.hit else CacheEntry(entry.key, entry.directory, entry.source_path,
                                                  entry.artifact_path, entry.log, True)

    def _lookup_disk_or_build(self, key: CacheKey, source: str, artifact_name: str, build: BuildFn,
                              force: bool) -> CacheEntry | None:
        """The entry from disk (or built into it); None when the root cannot be used."""
        directory = self.entry_dir(key)
        lock = _FileLock(directory.parent / f"{directory.name}.lock")
        try:
            make_private_dir(self.root)
            directory.mkdir(parents=True, exist_ok=True)
            lock.__enter__()
        except OSError as e:
            self._disable_disk(e)
            return None
        try:
            entry = None if force else self._load_valid(key, directory)
            if entry is None:
                entry = self._build_into(key, directory, source, artifact_name, build)
                self.evict(keep=directory)
            return entry
        finally:
            lock.__exit__()

    def _disable_disk(self, error: OSError) -> None:
        if self.root.exists() and not self.root.is_dir():
            reason = "it exists and is not a directory"
        else:
            reason = f"{type(error).__name__}: {error}"
        self.unusable_reason = reason
        log.warning("bwta cache: cannot use cache dir %s (%s); building kernels uncached, as with BWTA_CACHE=0",
                    self.root, reason)

    def _load_valid(self, key: CacheKey, directory: Path) -> CacheEntry | None:
        """The entry in ``directory`` if its manifest is valid and the artifact matches it."""
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            artifact = directory / manifest["artifact"]
            if artifact.stat().st_size != manifest["size"] or _sha256_file(artifact) != manifest["sha256"]:
                log.warning("bwta cache: artifact %s does not match its manifest; rebuilding", artifact)
                return None
            log_text = (directory / LOG_FILE).read_text() if (directory / LOG_FILE).exists() else ""
        except (OSError, ValueError, KeyError, TypeError):
            return None
        os.utime(directory / MANIFEST)  # LRU: touch on use
        return CacheEntry(key, directory, directory / manifest["source"], artifact, log_text, True)

    # ---- build -----------------------------------------------------------------------------

    def _build_into(self, key: CacheKey, directory: Path, source: str, artifact_name: str,
                    build: BuildFn) -> CacheEntry:
        (directory / MANIFEST).unlink(missing_ok=True)  # the entry is invalid until the new manifest lands
        source_name = _source_name(artifact_name)
        source_path = directory / source_name
        write_atomic(source_path, source.encode())
        write_atomic(directory / KEY_FILE, ("\n".join(key.debug_lines()) + "\n").encode())
        # Build into a temp name, then move: a crash mid-compile never leaves a half artifact.
        tmp_artifact = directory / f".{artifact_name}.{os.getpid()}.tmp"
        try:
            log_text = build(source_path, tmp_artifact)
            artifact = directory / artifact_name
            os.replace(tmp_artifact, artifact)
        finally:
            tmp_artifact.unlink(missing_ok=True)
        write_atomic(directory / LOG_FILE, log_text.encode())
        manifest = {"artifact": artifact_name, "source": source_name, "size": artifact.stat().st_size,
                    "sha256": _sha256_file(artifact)}
        write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
        return CacheEntry(key, directory, source_path, artifact, log_text, False)

    def _build_uncached(self, key: CacheKey, source: str, artifact_name: str, build: BuildFn) -> CacheEntry:
        """Build into ``<per-cache temp dir>/<digest>``; the temp dir goes with this cache object."""
        if self._nocache_dir is None:
            self._nocache_dir = Path(tempfile.mkdtemp(prefix="bwta-nocache-"))
            weakref.finalize(self, _remove_tree, self._nocache_dir, os.getpid())
        directory = self._nocache_dir / key.digest()
        directory.mkdir(exist_ok=True)
        return self._build_into(key, directory, source, artifact_name, build)

    # ---- maintenance (used by `bwta cache`) ------------------------------------------------

    def entries(self) -> Iterator[tuple[Path, dict, int, float]]:
        """(directory, manifest, size in bytes, last use time) of every valid-looking entry."""
        if not self.root.is_dir():
            return
        for manifest_path in self.root.glob(f"*/*/{MANIFEST}"):
            directory = manifest_path.parent
            try:
                manifest = json.loads(manifest_path.read_text())
                size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
                yield directory, manifest, size, manifest_path.stat().st_mtime
            except (OSError, ValueError):
                continue

    def size_bytes(self) -> int:
        return sum(size for _, _, size, _ in self.entries())

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries until the cache fits its limit; never ``keep``."""
        entries = sorted(self.entries(), key=lambda e: e[3])
        total = sum(e[2] for e in entries)
        removed = []
        for directory, _, size, _ in entries:
            if total <= self.size_limit:
                break
            if keep is not None and directory == keep:
                continue
            shutil.rmtree(directory, ignore_errors=True)
            total -= size
            removed.append(directory)
        if removed:
            log.info("bwta cache: evicted %d entries to stay under %d MB", len(removed), self.size_limit >> 20)
        return removed

    def clear(self) -> int:
        """Remove every entry; returns how many were removed."""
        count = 0
        if self.root.is_dir():
            for sub in self.root.iterdir():
                if sub.is_dir() and len(sub.name) == 2:
                    count += sum(1 for p in sub.iterdir() if p.is_dir())
                    shutil.rmtree(sub, ignore_errors=True)
        with self._lock:
            self._memory.clear()
        return count


def _remove_tree(path: Path, owner_pid: int) -> None:
    """Remove an uncached build dir, only in the process that made it (not in forked children)."""
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


def _source_name(artifact_name: str) -> str:
    stem = Path(artifact_name).stem
    return f"{stem}.c" if artifact_name.endswith(".so") else f"{stem}.src"


class _FileLock:
    """Exclusive flock on a side file: serialises builders of one entry across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _FileLock:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


_DEFAULT: dict[tuple[str, bool, int], KernelCache] = {}


def default_cache(cfg) -> KernelCache:
    """The process-wide cache for a :class:`bwta_compiler.config.Config` (one per root/flags)."""
    key = (str(Path(cfg.cache_dir).expanduser()), bool(cfg.cache), int(cfg.cache_size_mb))
    if key not in _DEFAULT:
        _DEFAULT[key] = KernelCache(key[0], enabled=key[1], size_limit_mb=key[2])
    return _DEFAULT[key]
