"""Small helpers over nested dict/list trees of arrays (optimizer state, the run record)."""

import numpy as np


def copy_tree(tree):
    """A new container tree holding the same (immutable) arrays."""
    if isinstance(tree, dict):
        return {k: copy_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [copy_tree(v) for v in tree]
    return tree


def assign_tree(dst, src):
    """Write src's leaves into dst's containers in place (compiled steps hold dst itself)."""
    items = dst.items() if isinstance(dst, dict) else enumerate(dst)
    for k, v in list(items):
        if isinstance(v, (dict, list)):
            assign_tree(v, src[k])
        else:
            dst[k] = src[k]


def jsonable(obj):
    """The same tree with numpy scalars as Python numbers (for JSON)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    return obj
