"""What users pass in: checks whose messages name the argument and the leaf, and private copies.

Parameters and hyperparameters may be any tree torch's pytree knows (a tensor, tuple, list,
dict, TensorDict, nested; `None` entries are kept as they are). Leaves are named as the user
would index them, e.g. `hparams['decay']` or `args[0]`, so an error points at the tensor to fix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from implicitfn._solution import ImplicitSolveError, all_finite
from implicitfn._tree import tree_map


def named_leaves(tree: Any, name: str) -> list[tuple[str, Any]]:
    """`[(name + path, leaf)]` for every leaf of `tree`, e.g. `("hparams['decay']", tensor)`."""
    flat = pytree.tree_flatten_with_path(tree)[0]
    return [(name + pytree.keystr(path), leaf) for path, leaf in flat]


def check_tree(tree: Any, name: str, allow_empty: bool = False, allow_none: bool = True) -> None:
    """Raise unless every leaf of `tree` is a floating-point tensor (or, where allowed, None)
    and there is at least one tensor."""
    flat = pytree.tree_leaves(tree)
    tensors = [leaf for leaf in flat if leaf is not None]
    if (
        (not allow_none and len(tensors) < len(flat))
        or (not tensors and not allow_empty)
        or not all(isinstance(leaf, torch.Tensor) and leaf.is_floating_point() for leaf in tensors)
    ):
        _explain_tree(named_leaves(tree, name), tree, name, allow_empty, allow_none)


def _explain_tree(flat, tree: Any, name: str, allow_empty: bool, allow_none: bool) -> None:
    """The error `check_tree` found, naming the leaf (names are built only here: they cost a
    path walk that every call would otherwise pay)."""
    if not allow_none and any(leaf is None for _, leaf in flat):
        missing = ", ".join(n for n, leaf in flat if leaf is None)
        raise TypeError(
            f"{missing}: None in {name}; the solution of the inner problem must be all tensors "
            "(None entries are fine in hparams and args, where they are passed through)."
        )
    flat = [(n, leaf) for n, leaf in flat if leaf is not None]
    if not flat and not allow_empty:
        raise ValueError(
            f"{name}: has no tensors (got {type(tree).__name__}); pass a tensor or a tree of "
            "tensors (dict, TensorDict, tuple, list)."
        )
    for leaf_name, leaf in flat:
        if isinstance(leaf, (bool, int, float, complex)):
            raise TypeError(
                f"{leaf_name}: a Python {type(leaf).__name__} cannot be differentiated; pass "
                f"torch.tensor({leaf!r}) (with the dtype of your parameters)."
            )
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{leaf_name}: expected a tensor, got {type(leaf).__name__}; {name} must be a "
                "tensor or a tree (dict, TensorDict, tuple, list) of tensors."
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"{leaf_name}: must be floating point, got {leaf.dtype}; convert with .float()."
            )


def check_finite(tree: Any, name: str, advice: str) -> None:
    """Raise, naming each leaf with NaN or Inf, when a floating tensor of `tree` has any."""
    flat = pytree.tree_leaves(tree)
    if all_finite([leaf for leaf in flat if _floating(leaf)]):  # one read for the whole tree
        return
    bad = [i for i, leaf in enumerate(flat) if _floating(leaf) and not all_finite(leaf)]
    if bad:
        names = [leaf_name for leaf_name, _ in named_leaves(tree, name)]
        raise ValueError(f"{', '.join(names[i] for i in bad)}: contains NaN or Inf; {advice}")


def _floating(leaf: Any) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.is_floating_point()


def check_args_finite(args: Sequence[Any]) -> None:
    """Raise, naming the argument, when a floating tensor in `args` has NaN or Inf."""
    check_finite(tuple(args), "args", "clean the data before the inner solve.")


def detached(tree: Any) -> Any:
    """`tree` with every tensor detached (the same storage)."""
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def private_copy(tree: Any) -> Any:
    """`tree` with every tensor detached and copied: the inner solver may train it in place."""
    return tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)


def versions(tree: Any) -> list[int]:
    """The version counters of the tensors of `tree` (they move on every in-place change)."""
    return [leaf._version for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def check_unmodified(tree: Any, before: list[int], name: str, function: str) -> None:
    """Raise when `function` changed a tensor of `tree` in place (its version counter moved)."""
    changed = [
        leaf_name
        for (leaf_name, leaf), version in zip(
            [(n, t) for n, t in named_leaves(tree, name) if isinstance(t, torch.Tensor)],
            before,
            strict=True,
        )
        if leaf._version != version
    ]
    if changed:
        raise ValueError(
            f"{function} modified {', '.join(changed)} in place: your data has changed. The "
            "inner solver receives its own copies of params and hparams to train in place, but "
            "the data in *args is shared: copy it inside the solver (x = x.clone()) before "
            "changing it."
        )


def input_names(hparams: Any, args: Sequence[Any], keywords: Sequence[str] = ()) -> list[str]:
    """The names of the leaves of `(hparams, tuple(args))`, the last `len(keywords)` arguments
    being keyword arguments: `hparams['decay']`, `args[0]`, `kwargs['x']`."""
    positional = tuple(args)[: len(args) - len(keywords)]
    named = tuple(args)[len(args) - len(keywords) :]
    names = [name for name, _ in named_leaves(hparams, "hparams")]
    names += [name for name, _ in named_leaves(positional, "args")]
    names += [name for name, _ in named_leaves(dict(zip(keywords, named, strict=True)), "kwargs")]
    return names


def check_gradients(gradients: Sequence[Any], names: Callable[[], Sequence[str]]) -> None:
    """Never hand back a NaN/Inf gradient: name the input whose derivative is not finite
    (`names()` builds the inputs' names, only for the message)."""
    tensors = [gradient for gradient in gradients if isinstance(gradient, torch.Tensor)]
    if all_finite(tensors):
        return
    bad = [
        i
        for i, gradient in enumerate(gradients)
        if isinstance(gradient, torch.Tensor) and not all_finite(gradient)
    ]
    if bad:
        raise ImplicitSolveError(
            f"The gradient for {', '.join(names()[i] for i in bad)} is NaN/Inf: the training loss's mixed derivative "
            "d2L/(dw d input) is not finite at the solution (e.g. sqrt or log of a "
            "hyperparameter at 0). Check that input's value or reparametrise it."
        )
