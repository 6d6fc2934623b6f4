"""The pass runner: runs the pipeline in order, dumps the graph after each pass, verifies the IR
invariants, counts rewrites, and names the failing pass (and those before it) in any error."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch.fx import GraphModule

from bwta_compiler.errors import BWTAError, PassError

from .context import PassContext
from .verify import verify

Pass = Callable[[GraphModule, PassContext], GraphModule]


def run_pipeline(gm: GraphModule, ctx: PassContext, pipeline: Sequence[Pass], dump: object | None = None) -> GraphModule:
    if dump is not None:
        dump.graph(0, "input", gm)
    for i, p in enumerate(pipeline, 1):
        name = p.__name__
        try:
            gm = p(gm, ctx)
            gm.recompile()
            if ctx.cfg.verify:
                verify(gm, name, selected="select_kernels" in ctx.passes_run + [name])
        except BWTAError:
            raise
        except Exception as e:
            raise PassError(f"pass {name} failed (after {', '.join(ctx.passes_run) or 'no other pass'}): "
                            f"{type(e).__name__}: {e}") from e
        ctx.passes_run.append(name)
        if dump is not None:
            dump.graph(i, name, gm)
    return gm
