"""Error types.  Every error names what was wrong (the op, the node, the file, the shape)."""

from __future__ import annotations


class BWTAError(Exception):
    """Base class of every error bwta raises on purpose."""


class UnsupportedError(BWTAError):
    """The input asks for something bwta does not handle (in strict mode this aborts a compile)."""


class PassError(BWTAError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class CompileError(BWTAError):
    """A generated kernel failed to compile; carries the compiler log and the source path."""

    def __init__(self, message: str, log: str = "", source_path: str | None = None) -> None:
        detail = message
        if source_path:
            detail += f"\n  source: {source_path}"
        if log:
            detail += "\n  compiler log:\n" + "\n".join("    " + line for line in log.strip().splitlines())
        super().__init__(detail)
        self.log = log
        self.source_path = source_path


class OnnxImportError(BWTAError):
    """An ONNX file could not be imported; the message names the file and the node(s)."""
