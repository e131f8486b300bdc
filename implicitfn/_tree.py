"""TensorDict algebra for the solvers.

Every function here accepts a TensorDict of any nesting, a (nested) dict of tensors or a
plain tensor, never modifies its inputs, and runs under `torch.func` transforms: the trees
are taken apart with `torch.utils._pytree`, on which tensordict registers `TensorDict`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = [
    "tree_axpy",
    "tree_norm",
    "tree_ravel",
    "tree_vdot",
    "tree_zeros_like",
]

Tree = Any


def leaves(tree: Tree) -> list[torch.Tensor]:
    """The tensor leaves of `tree`, in a fixed order."""
    if isinstance(tree, torch.Tensor):  # the solvers' raveled vectors: no tree walk
        return [tree]
    return pytree.tree_leaves(tree)


def tree_map(fn: Callable, tree: Tree, *rest: Tree) -> Tree:
    return pytree.tree_map(fn, tree, *rest)


def ravel_leaves(flat: list[torch.Tensor]) -> torch.Tensor:
    """The leaves concatenated into one vector (they must share a dtype and a device)."""
    return torch.cat([leaf.reshape(-1) for leaf in flat])


def unravel_leaves(vector: torch.Tensor, shapes: tuple[torch.Size, ...]) -> list[torch.Tensor]:
    """Undo `ravel_leaves`: views of `vector` with the given shapes."""
    pieces = torch.split(vector, [math.prod(shape) for shape in shapes])
    return [piece.view(shape) for piece, shape in zip(pieces, shapes, strict=True)]


def can_ravel(flat: list[Any]) -> bool:
    """Whether `ravel_leaves` applies: tensors of one floating dtype on one device."""
    return bool(flat) and all(
        isinstance(leaf, torch.Tensor)
        and leaf.dtype == flat[0].dtype
        and leaf.device == flat[0].device
        and leaf.is_floating_point()
        for leaf in flat
    )


def tree_where(condition: torch.Tensor, if_true: Tree, if_false: Tree) -> Tree:
    """Leafwise `torch.where` with a scalar boolean `condition` (vmap-safe loop masking)."""
    return pytree.tree_map(lambda a, b: torch.where(condition, a, b), if_true, if_false)


def key_paths(tree: Tree) -> list[str]:
    """The path of every leaf, as `pytree.keystr` writes it (`['layer']['weight']`), in order."""
    return [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(tree)[0]]


def describe(tree: Tree) -> str:
    """A short human-readable description of a tree's structure, for error messages."""
    parts = [
        f"{path or '<tensor>'}: {tuple(leaf.shape)}"
        for path, leaf in zip(key_paths(tree), pytree.tree_leaves(tree), strict=True)
    ]
    return "{" + ", ".join(parts) + "}"


def same_structure(a: Tree, b: Tree) -> bool:
    """True when `a` and `b` have the same keys, nesting and leaf shapes."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):  # raveled: no tree walk
        return a.shape == b.shape
    flat_a, spec_a = pytree.tree_flatten_with_path(a)
    flat_b, spec_b = pytree.tree_flatten_with_path(b)
    if [p for p, _ in flat_a] != [p for p, _ in flat_b]:
        return False
    return all(
        isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
        for (_, x), (_, y) in zip(flat_a, flat_b, strict=True)
    )


def tree_vdot(a: Tree, b: Tree) -> torch.Tensor:
    r"""Inner product $\langle a, b\rangle = \sum_i a_i b_i$ over all leaves.

    **Arguments:**

    - `a`, `b`: trees of the same structure (TensorDict, nested dict or tensor).

    **Returns:** a 0-dim tensor.

    ```python
    >>> import torch, implicitfn
    >>> from tensordict import TensorDict
    >>> a = TensorDict({"w": torch.ones(3), "b": torch.tensor(2.0)})
    >>> implicitfn.tree_vdot(a, a)
    tensor(7.)
    ```
    """
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):  # fast path: one flat vector
        return _dot(a, b)
    pairs = zip(leaves(a), leaves(b), strict=True)
    return torch.stack([_dot(x, y) for x, y in pairs]).sum()


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.dtype == y.dtype and not x.is_complex():  # one kernel, no temporary
        return torch.dot(x.reshape(-1), y.reshape(-1))
    return torch.sum(x * y)


def tree_norm(tree: Tree) -> torch.Tensor:
    r"""Euclidean norm $\lVert a\rVert_2$ of all leaves taken together.

    **Arguments:**

    - `tree`: a TensorDict, nested dict or tensor.

    **Returns:** a 0-dim tensor.

    ```python
    >>> import torch, implicitfn
    >>> implicitfn.tree_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
    tensor(5.)
    ```
    """
    return torch.sqrt(tree_vdot(tree, tree))


def tree_axpy(alpha: torch.Tensor | float, x: Tree, y: Tree) -> Tree:
    r"""$\alpha x + y$, leafwise, returning a new tree with the structure of `y`.

    **Arguments:**

    - `alpha`: a Python number or a 0-dim tensor.
    - `x`, `y`: trees of the same structure.

    **Returns:** a new tree; `x` and `y` are unchanged.

    ```python
    >>> import torch, implicitfn
    >>> implicitfn.tree_axpy(2.0, {"w": torch.ones(2)}, {"w": torch.zeros(2)})
    {'w': tensor([2., 2.])}
    ```
    """
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return _axpy(alpha, x, y)
    return pytree.tree_map(functools.partial(_axpy, alpha), x, y)


def _axpy(alpha: torch.Tensor | float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # One fused kernel instead of a product and a sum (a 0-dim `alpha` broadcasts).
    if isinstance(alpha, torch.Tensor):
        return torch.addcmul(b, alpha, a)
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        return torch.add(b, a, alpha=alpha)
    return alpha * a + b


def tree_scale(alpha: torch.Tensor | float, x: Tree) -> Tree:
    if isinstance(x, torch.Tensor):
        return alpha * x
    return pytree.tree_map(lambda a: alpha * a, x)


def tree_sub(x: Tree, y: Tree) -> Tree:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return torch.sub(x, y)
    return pytree.tree_map(torch.sub, x, y)


def tree_add(x: Tree, y: Tree) -> Tree:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return torch.add(x, y)
    return pytree.tree_map(torch.add, x, y)


def tree_zeros_like(tree: Tree) -> Tree:
    """A tree of zeros with the structure, shapes, dtypes and devices of `tree`.

    **Arguments:**

    - `tree`: a TensorDict, nested dict or tensor.

    **Returns:** a new tree of zeros.

    ```python
    >>> import torch, implicitfn
    >>> implicitfn.tree_zeros_like({"w": torch.ones(2)})
    {'w': tensor([0., 0.])}
    ```
    """
    return pytree.tree_map(torch.zeros_like, tree)


def tree_ravel(tree: Tree) -> tuple[torch.Tensor, Callable[[torch.Tensor], Tree]]:
    """Flatten all leaves into one vector, and a function that undoes it.

    Used for dense references (materialising an operator as a matrix).

    **Arguments:**

    - `tree`: a TensorDict, nested dict or tensor whose leaves share a dtype.

    **Returns:** `(vector, unravel)` where `unravel(vector)` rebuilds a tree of the same
    structure (a new tree; views of the vector).

    ```python
    >>> import torch, implicitfn
    >>> vec, unravel = implicitfn.tree_ravel({"a": torch.ones(2, 2), "b": torch.zeros(1)})
    >>> vec.shape
    torch.Size([5])
    >>> unravel(vec)["a"].shape
    torch.Size([2, 2])
    ```
    """
    flat, spec = pytree.tree_flatten(tree)
    shapes = [leaf.shape for leaf in flat]
    sizes = [math.prod(shape) for shape in shapes]
    vector = torch.cat([leaf.reshape(-1) for leaf in flat]) if flat else torch.zeros(0)

    def unravel(vec: torch.Tensor) -> Tree:
        pieces = torch.split(vec, sizes)
        return pytree.tree_unflatten(
            [p.reshape(s) for p, s in zip(pieces, shapes, strict=True)], spec
        )

    return vector, unravel
