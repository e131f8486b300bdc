"""Checks and copies of what users pass in: one place for the messages that name the argument."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from implicitfn._solution import all_finite
from implicitfn._tree import leaves, tree_map


def check_tree(tree: Any, name: str, allow_empty: bool = False) -> None:
    """Raise unless `tree` is a TensorDict, dict or tensor of floating-point tensors."""
    if not isinstance(tree, (torch.Tensor, dict)) and not _is_tensordict(tree):
        raise TypeError(
            f"{name}: expected a TensorDict, a dict of tensors or a tensor, got "
            f"{type(tree).__name__}; wrap it, e.g. TensorDict({{'lam': value}}) or {{'lam': value}}."
        )
    flat = leaves(tree)
    if not flat and not allow_empty:
        raise ValueError(f"{name}: has no tensors; pass at least one.")
    for leaf in flat:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{name}: leaves must be tensors, got {type(leaf).__name__}.")
        if not leaf.is_floating_point():
            raise TypeError(
                f"{name}: leaves must be floating point, got {leaf.dtype}; convert with .float()."
            )


def _is_tensordict(tree: Any) -> bool:
    from tensordict import TensorDictBase

    return isinstance(tree, TensorDictBase)


def check_args_finite(args: Sequence[Any]) -> None:
    """Raise, naming the argument, when a floating tensor in `args` has NaN or Inf."""
    for i, arg in enumerate(args):
        floating = [
            leaf
            for leaf in leaves(arg)
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
        ]
        if floating and not all_finite(floating):
            raise ValueError(
                f"args[{i}]: contains NaN or Inf; clean the data before the inner solve."
            )


def detached(tree: Any) -> Any:
    """`tree` with every tensor detached (the same storage)."""
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)
