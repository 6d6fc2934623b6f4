"""Render kernel sources from Jinja templates and frozen Params.

One template per kernel (``templates/<target>/<name>.<ext>.jinja``), ``StrictUndefined`` so a
missing value is an error, and only typed values substituted: every Params field is validated
(ints, enums) before rendering, so nothing from a model file ever reaches the source text.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from importlib import resources
from typing import Any

import jinja2

from .kernels import template_file

_ALLOWED_TYPES = (bool, int, float, str, type(None))


@functools.cache
def environment(target: str) -> jinja2.Environment:
    return jinja2.Environment(
        # The templates package is mapped from the repo root (package-dir), so load it by its own
        # package name: "bwta_compiler" has no templates/ directory in an editable install.
        loader=jinja2.PackageLoader("bwta_compiler.templates", target),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _check_value(name: str, value: Any) -> Any:
    if not isinstance(value, _ALLOWED_TYPES):
        raise TypeError(f"template value {name!r} has type {type(value).__name__}; only plain scalars are rendered")
    if isinstance(value, str) and value and not value.replace("_", "").isalnum():  # "" = unset
        raise ValueError(f"template value {name!r}={value!r} is not an identifier-like enum")
    return value


def render(target: str, name: str, params: Any, **extra: Any) -> str:
    """Render template ``name`` for ``target`` with the fields of a frozen Params dataclass."""
    values = {f.name: _check_value(f.name, getattr(params, f.name)) for f in dataclasses.fields(params)}
    values.update({k: _check_value(k, v) for k, v in extra.items()})
    return environment(target).get_template(template_file(target, name)).render(**values)


@functools.lru_cache(maxsize=1)
def bwta_key() -> str:
    """Hash of bwta's own version, templates and code generators: part of every cache key, so an
    edit to any of them invalidates old kernels without a manual version bump."""
    from . import __version__

    h = hashlib.sha256(__version__.encode())
    roots = [resources.files("bwta_compiler.templates"), resources.files("bwta_compiler") / "codegen.py",
             resources.files("bwta_compiler") / "kernels.py", resources.files("bwta_compiler.runtime")]
    for root in roots:
        for path in sorted(_walk(root), key=lambda p: str(p)):
            h.update(str(path.name).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _walk(node):
    if node.is_file():
        if node.name.endswith((".jinja", ".h", ".cuh", ".py")):
            yield node
        return
    for child in node.iterdir():
        if child.name != "__pycache__":
            yield from _walk(child)
