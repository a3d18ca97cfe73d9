"""JSON from writers the agent does not trust (lease records, the network config): decoded
only within a size and a nesting bound, so no document can exhaust memory or the stack."""

from __future__ import annotations

import json
from typing import Any


def json_depth(doc: Any) -> int:
    """How deeply arrays and objects nest in a decoded document (a scalar: 0); iterative, so
    a hostile document cannot exhaust the stack here either."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node)
    return deepest


def load_bounded(raw: bytes | str, what: str, limit: int, depth: int) -> Any:
    """`json.loads`, refusing more than `limit` bytes and more than `depth` levels of nesting
    (deeper input would exhaust the decoder's recursion). ValueError names `what` and the
    bound that was passed."""
    if len(raw) > limit:
        raise ValueError(f"{what} is {len(raw)} bytes, more than the {limit} allowed")
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise ValueError(f"{what} nests deeper than {depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} is not valid JSON ({e})") from None
    if json_depth(doc) > depth:
        raise ValueError(f"{what} nests deeper than {depth} levels")
    return doc
