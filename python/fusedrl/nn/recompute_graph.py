"""Does anything in a recorded autograd graph read the value of a deferred (placeholder) output?

A checkpointed layer's recompute may return placeholders for its chunked MLP's output (fusedrl.nn.chunked_mlp,
`deferred_outputs`) when the only use of that value is to be added to the residual stream: an addition's backward
passes the gradient through without reading either operand. `only_value_free_ops_above(outputs, nodes)` walks the
graph from the layer's outputs and answers True when every node between an output and a deferred node is such an
operation (add, subtract, dtype cast, view/reshape/clone); anything else — a norm after the MLP (Gemma), a
multiplication, a module hook — may have saved the placeholder's value, and the caller then recomputes normally.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

# Backward nodes whose gradient does not depend on their inputs' values.
VALUE_FREE_NODES = frozenset({
    "AddBackward0", "SubBackward0", "ToCopyBackward0", "ViewBackward0", "ReshapeAliasBackward0",
    "UnsafeViewBackward0", "CloneBackward0", "AliasBackward0", "ExpandBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "UnsqueezeBackward0",
})


def only_value_free_ops_above(outputs: Iterable[Any], deferred: Sequence[Any]) -> bool:
    """True when every path from a tensor in `outputs` down to a node in `deferred` crosses only value-free nodes."""
    targets = set(deferred)
    roots = [out.grad_fn for out in outputs if isinstance(out, torch.Tensor) and out.grad_fn is not None]
    reaches: dict[Any, bool] = {}  # node -> some deferred node lies below it
    stack: list[tuple[Any, bool]] = [(root, False) for root in roots]
    while stack:
        node, children_done = stack.pop()
        if node in reaches and not children_done:
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if not children_done:
            reaches.setdefault(node, False)  # visiting: a DAG has no cycles, so this is only a placeholder
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in reaches)
            continue
        reaches[node] = node in targets or any(reaches.get(child, False) for child in children)
    found = {node for node in targets if node in reaches}
    if found != targets:  # a deferred node the outputs do not lead to: its placeholder went somewhere else
        return False
    return all(type(node).__name__ in VALUE_FREE_NODES
               for node, below in reaches.items() if below and node not in targets)
