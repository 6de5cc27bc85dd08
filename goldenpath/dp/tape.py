"""Recording a forward pass for per-sample gradients: every call of the modules that own trained
parameters (:class:`Tape`), and, from the autograd graph, which recorded call accounts for each use of
each parameter (:func:`attribute`). :mod:`goldenpath.dp.per_sample` builds its fast path on these.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten


def leaves_of(x) -> list:
    """``tree_flatten(x)[0]``, a lone tensor without pytree's walk (a few microseconds per module call: a
    ResNet-18's DP step records some 40 calls, each flattened several times)."""
    return [x] if torch.is_tensor(x) else tree_flatten(x)[0]


def parameters_of(module: nn.Module):
    """``module.named_parameters(remove_duplicate=False)``, a module without submodules read from its own dict
    (named_parameters walks named_modules: ~25 us a call, several per recorded call and step)."""
    if module._modules:
        return module.named_parameters(remove_duplicate=False)
    return [(n, p) for n, p in module._parameters.items() if p is not None]


def seq_now() -> int:
    """The autograd sequence number the next graph node will get (nodes are numbered in creation order)."""
    return torch._C._autograd._get_sequence_nr()


@dataclass
class Call:
    """One recorded module call; the graph nodes its forward created are numbered [start, end)."""

    module: nn.Module
    args: tuple
    kwargs: dict
    start: int
    versions: list  # (tensor, its version when the call began): an in-place change later makes the call unusable
    output: Any = None
    end: int = 0
    edges: list = field(default_factory=list)  # (index among the output's leaves, GradientEdge), leaves needing grad
    saved: Any = None  # what the tape's ``capture`` read from the call's output right after its forward


class Tape:
    """Forward pre-hooks and hooks recording every call of the given modules; ``capture(module, output)``,
    when given, is called as each call returns and its answer kept as the call's ``saved`` (what the output's
    autograd node holds now, e.g. a norm layer's statistics, is freed by the backward)."""

    def __init__(self, modules: list[nn.Module], capture=None):
        self.modules, self.calls, self._open, self.capture = modules, [], [], capture

    def __enter__(self):
        self._handles = [h for m in self.modules for h in (
            m.register_forward_pre_hook(self._pre, with_kwargs=True),
            m.register_forward_hook(self._post, with_kwargs=True))]
        return self

    def _pre(self, module, args, kwargs):
        flat = list(args) if not kwargs and all(map(torch.is_tensor, args)) else tree_flatten((args, kwargs))[0]
        tensors = [x for x in flat if torch.is_tensor(x)]
        self._open.append(Call(module, args, kwargs, seq_now(), [(t, t._version) for t in tensors]))

    def _post(self, module, args, kwargs, output):
        call = self._open.pop()
        call.output, call.end = output, seq_now()
        if self.capture is not None:
            call.saved = self.capture(module, output)
        leaves = leaves_of(output)
        call.edges = [(i, get_gradient_edge(t)) for i, t in enumerate(leaves)
                      if torch.is_tensor(t) and t.requires_grad]
        self.calls.append(call)

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def batched(call: Call, b: int) -> bool:
    """Whether the call can be differentiated per sample: its inputs unchanged since, every output needing a
    gradient batched along dim 0 (a tuple output's other parts carry no gradient)."""
    if any(t._version != v for t, v in call.versions) or not call.edges:
        return False
    leaves = leaves_of(call.output)
    return all(leaves[i].dim() > 0 and leaves[i].shape[0] == b for i, _ in call.edges)


class _Nesting:
    """The recorded calls in forward order (outer before inner), each with its enclosing call (-1: none)."""

    def __init__(self, calls: list[Call]):
        self.order = sorted(range(len(calls)), key=lambda i: (calls[i].start, -calls[i].end))
        self.starts = [calls[i].start for i in self.order]
        self.ends = [calls[i].end for i in self.order]
        self.parent, open_ = [-1] * len(self.order), []
        for k in range(len(self.order)):
            while open_ and self.ends[open_[-1]] <= self.starts[k]:
                open_.pop()
            self.parent[k] = open_[-1] if open_ else -1
            open_.append(k)

    def innermost(self, seq: int) -> int:
        """The innermost call whose forward created graph node number ``seq`` (-1: none)."""
        k = bisect.bisect_right(self.starts, seq) - 1
        while k != -1 and seq >= self.ends[k]:
            k = self.parent[k]
        return k

    def nested(self, k: int, among: set[int]) -> bool:
        """Whether a call enclosing call ``k`` is one of ``among``."""
        k = self.parent[k]
        while k != -1:
            if k in among:
                return True
            k = self.parent[k]
        return False


def _uses(root: torch.Tensor, calls: list[Call], nest: _Nesting,
          name_of: dict[int, str]) -> tuple[dict[int, set[int]], list[bool]]:
    """Walk the autograd graph from ``root``: for each trained parameter (by id), the calls (in ``nest``
    order) holding it innermost around each of its uses; and for each call whether the graph enters the
    nodes its forward created other than through its output (leaky)."""
    order, starts, ends, parent = nest.order, nest.starts, nest.ends, nest.parent
    entries = [{(e.node, e.output_nr) for _, e in calls[i].edges} for i in order]
    holds: dict[int, set[int]] = {}

    def held(k: int) -> set[int]:
        m = calls[order[k]].module
        if id(m) not in holds:
            holds[id(m)] = {id(p) for _, p in parameters_of(m)}
        return holds[id(m)]

    leaky = [False] * len(order)

    def enter(node, nr: int, outer_seq: int) -> None:  # the edge into (node, nr) from a node numbered outer_seq
        k = nest.innermost(node._sequence_nr())
        while k != -1 and not starts[k] <= outer_seq < ends[k]:
            leaky[k] |= (node, nr) not in entries[k]
            k = parent[k]

    sites: dict[int, set[int]] = {}
    edge = get_gradient_edge(root)
    enter(edge.node, edge.output_nr, -1)
    stack, seen = [edge.node], {edge.node}
    while stack:
        node = stack.pop()
        seq = node._sequence_nr()
        inner = None
        for nxt, nr in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)  # an AccumulateGrad: a use of a leaf tensor
            if var is not None:
                if id(var) in name_of:
                    k = nest.innermost(seq) if inner is None else inner
                    inner = k
                    while k != -1 and id(var) not in held(k):
                        k = parent[k]
                    sites.setdefault(id(var), set()).add(k)
                continue
            enter(nxt, nr, seq)
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return sites, leaky


def attribute(root: torch.Tensor, calls: list[Call], usable: list[bool],
              name_of: dict[int, str]) -> tuple[dict[int, set[str]], set[str]]:
    """Which recorded call accounts for every use of every trained parameter, from the autograd graph.

    A use (a graph node with the parameter's AccumulateGrad among its inputs) belongs to the innermost
    enclosing call of a module holding the parameter. A call accounts for its parameters' uses only when it
    is usable and *sealed*: the graph enters the nodes its forward created only through its output. A
    parameter is left to the reference path when any of its uses has no such call, or when its calls nest
    (the outer call's gradient would count the inner one's uses twice).

    Returns ({call index: names it accounts for}, names for the reference path).
    """
    nest = _Nesting(calls)
    sites, leaky = _uses(root, calls, nest, name_of)
    accounts: dict[int, set[str]] = {}
    reference = set()
    for pid, ks in sites.items():
        if any(k == -1 or leaky[k] or not usable[nest.order[k]] or nest.nested(k, ks) for k in ks):
            reference.add(name_of[pid])
        else:
            for k in ks:
                accounts.setdefault(nest.order[k], set()).add(name_of[pid])
    return accounts, reference
