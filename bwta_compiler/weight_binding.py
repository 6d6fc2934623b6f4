"""Packed weights of a compiled graph, bound per call to the parameters the caller passed.

The passes fold every frozen weight into packed codes at compile time.  Those packed tensors
reach the compiled graph as extra inputs after the real ones (:func:`lift_constants`): inductor
keeps its own copies of a graph's constants, so constants could never follow a parameter change.

:class:`WeightBinder` then picks, per call, the packed set that belongs to the parameters in the
call's arguments.  Dynamo reuses one compiled graph for every instance of a model class (the
parameters are graph inputs), and a parameter may change in place (``load_state_dict``), get new
storage (``p.data = t``, ``model.to(...)``) or be another tensor altogether; each distinct set of
(parameter, version, storage) gets its own packed tensors, packed once and kept in a small LRU, so
instances used alternately, or from two threads, never share or overwrite each other's weights.
A change through ``p.data.copy_(...)`` moves neither version nor storage and is not seen.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx import GraphModule

from .tensor_stamp import TensorStamp

# Packed sets kept per compiled graph (instances or weight versions in use at once).
MAX_BOUND_SETS = 8


def lift_constants(gm: GraphModule, fake_inputs: Sequence[Any]) -> tuple[list[str], list[torch.Tensor], list[Any]]:
    """Turn the tensors the passes created (``_bwta_*`` attributes: packed weights, their alphas)
    into graph inputs after the real ones; returns their attribute names, tensors and fake twins."""
    mode = torch._guards.detect_fake_mode(fake_inputs)
    nodes = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("_bwta_")
             and isinstance(getattr(gm, n.target, None), torch.Tensor)]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if mode is None or not nodes or not placeholders:
        return [], [], []
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    fakes: list[Any] = []
    inputs: dict[str, torch.fx.Node] = {}
    last = placeholders[-1]
    for node in nodes:
        if node.target not in inputs:
            t = getattr(gm, node.target)
            with gm.graph.inserting_after(last):
                last = inputs[node.target] = gm.graph.placeholder(f"{node.target}_input")
            with unset_fake_temporarily():
                fake = mode.from_tensor(t, static_shapes=True)
            last.meta["val"] = fake
            names.append(node.target)
            tensors.append(t)
            fakes.append(fake)
        node.replace_all_uses_with(inputs[node.target])
        gm.graph.erase_node(node)
    gm.recompile()
    return names, tensors, fakes


class _BoundSet:
    """The packed tensors for one set of parameter tensors (by identity, version and storage)."""

    __slots__ = ("extra", "refs", "stamps")

    def __init__(self, params: Sequence[torch.Tensor], extra: list[torch.Tensor]) -> None:
        self.refs = [weakref.ref(p) for p in params]
        self.stamps = [TensorStamp(p) for p in params]
        self.extra = extra

    def matches(self, params: Sequence[torch.Tensor]) -> bool:
        # The weak reference makes a new tensor that reuses a dead one's id and address a miss.
        return all(r() is p and s.matches(p) for r, s, p in zip(self.refs, self.stamps, params))


class WeightBinder:
    """Boxed callable: ``compiled(args + packed weights of the parameters in args)``."""

    _boxed_call = True

    def __init__(self, compiled: Callable, slots: Sequence[tuple[int, int | None, int | None]],
                 base: Sequence[torch.Tensor | None], pad_bits: int,
                 params: Sequence[torch.Tensor] | None = None) -> None:
        """``slots``: per folded weight, (graph input index of the float parameter, slot of its
        packed words, slot of its alpha) among the extra inputs ``base``.  ``params``: the
        parameters ``base`` was packed from; without them (a loaded artifact) the first call packs
        the weights of the parameters it is given, and ``base`` holds only the lifted constants
        no slot recomputes."""
        self.compiled = compiled
        self.pad_bits = pad_bits
        self.slots = list(slots)
        self.base = list(base)
        self.sets: OrderedDict[int, _BoundSet] = OrderedDict()
        self.last: _BoundSet | None = None
        if params is not None:
            self.last = _BoundSet(params, self.base)
            self.sets[id(self.last)] = self.last
        self.lock = threading.Lock()

    @staticmethod
    def slots_of(folded: Sequence[Any], names: Sequence[str]) -> list[tuple[int, int | None, int | None]]:
        """The slots of the folded weights ``folded`` among the lifted constants ``names``."""
        position = {name: i for i, name in enumerate(names)}
        return [(fw.input_index, position.get(fw.packed_attr), position.get(fw.alpha_attr)) for fw in folded]

    def __call__(self, args: list) -> Any:
        params = [args[i] for i, _, _ in self.slots]
        bound = self.last
        if bound is None or not bound.matches(params):
            bound = self._bind(params)
        if bound.extra:
            # Boxed convention: the callee owns (and may clear) the list, so extend it in place.
            args = args if isinstance(args, list) else list(args)
            args.extend(bound.extra)
        return self.compiled(args)

    def _bind(self, params: list[torch.Tensor]) -> _BoundSet:
        from bwta_compiler.passes.fold_weight_codes import pack_weight

        with self.lock:
            for key, cand in reversed(self.sets.items()):
                if cand.matches(params):
                    self.sets.move_to_end(key)
                    self.last = cand
                    return cand
            extra = list(self.base)
            for (_, p_slot, a_slot), cur in zip(self.slots, params):
                if a_slot is not None:
                    packed, alpha = pack_weight(cur, self.pad_bits)
                    extra[a_slot] = alpha
                else:                      # a frozen model's packed buffer: used as it is
                    packed = cur.contiguous()
                if p_slot is not None:
                    extra[p_slot] = packed
            bound = _BoundSet(params, extra)
            self.sets[id(bound)] = bound
            while len(self.sets) > MAX_BOUND_SETS:
                self.sets.popitem(last=False)
            self.last = bound
            return bound
