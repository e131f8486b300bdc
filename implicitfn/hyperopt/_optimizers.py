"""One interface over the two kinds of optimiser the loop accepts.

A `torch.optim` optimiser updates the tensors it was built on in place; a torchopt
`GradientTransformation` is pure. The loop owns the tensors it optimises (clones of the user's),
so in-place updates never reach user tensors. Both adapters work on flat lists of tensors, the
leaves of the parameter or hyperparameter tree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
import torchopt
from torchopt.base import GradientTransformation

OptimizerSpec = GradientTransformation | Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def check_optimizer_spec(spec: Any, name: str) -> None:
    """Raise before any computing when `spec` is neither kind of optimiser we accept."""
    hint = (
        "pass a torchopt GradientTransformation (e.g. torchopt.adam(1e-2)) or a callable that "
        "builds a torch.optim optimiser from a list of tensors (e.g. "
        "functools.partial(torch.optim.Adam, lr=1e-2))"
    )
    if isinstance(spec, torch.optim.Optimizer):
        raise TypeError(
            f"{name}: got an optimiser already built on other tensors; {hint}, so that the loop "
            "can build it on its own copies."
        )
    if not isinstance(spec, GradientTransformation) and not callable(spec):
        raise TypeError(f"{name}: expected an optimiser, got {type(spec).__name__}; {hint}.")


def build_optimizer(spec: OptimizerSpec, tensors: Sequence[torch.Tensor], name: str):
    """The adapter for `spec`, optimising `tensors` (which the caller owns)."""
    if isinstance(spec, GradientTransformation):
        return FunctionalOptimizer(spec, list(tensors))
    optimizer = spec(list(tensors))
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{name}: the callable returned {type(optimizer).__name__}, not a torch.optim "
            "optimiser; pass e.g. functools.partial(torch.optim.Adam, lr=1e-2)."
        )
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError(
            f"{name}: LBFGS needs a closure that re-evaluates the loss, which a step of this "
            "loop does not have; use a first-order optimiser (SGD, Adam, ...)."
        )
    return TorchOptimizer(optimizer, list(tensors))


def _cloned(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(
        lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree
    )


class TorchOptimizer:
    """A `torch.optim` optimiser stepping on tensors we own: gradients go in through `.grad`."""

    def __init__(self, optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor]):
        self.optimizer = optimizer
        self.tensors = tensors

    def step(self, gradients: Sequence[torch.Tensor]) -> None:
        for tensor, gradient in zip(self.tensors, gradients, strict=True):
            tensor.grad = gradient.detach()
        self.optimizer.step()
        for tensor in self.tensors:
            tensor.grad = None

    def load_tensors(self, values: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for tensor, value in zip(self.tensors, values, strict=True):
                tensor.copy_(value)

    def state_dict(self) -> Any:
        # torch.optim returns references to its live state; a checkpoint needs a snapshot.
        return _cloned(self.optimizer.state_dict())

    def load_state_dict(self, state: Any) -> None:
        self.optimizer.load_state_dict(state)


class FunctionalOptimizer:
    """A torchopt `GradientTransformation` with its state held here."""

    def __init__(self, transform: GradientTransformation, tensors: list[torch.Tensor]):
        self.transform = transform
        self.tensors = tensors
        self.state = transform.init(tuple(tensors))

    def step(self, gradients: Sequence[torch.Tensor]) -> None:
        params = tuple(self.tensors)
        updates, self.state = self.transform.update(
            tuple(g.detach() for g in gradients), self.state, params=params, inplace=False
        )
        self.tensors = list(torchopt.apply_updates(params, updates, inplace=False))

    def load_tensors(self, values: Sequence[torch.Tensor]) -> None:
        self.tensors = [value.detach().clone() for value in values]

    def state_dict(self) -> Any:
        # torchopt states are named tuples, which torch.load(weights_only=True) refuses: keep
        # the leaves only and take the structure from a fresh init when loading.
        return [_cloned(leaf) for leaf in torchopt.pytree.tree_leaves(self.state)]

    def load_state_dict(self, state: Any) -> None:
        structure = torchopt.pytree.tree_structure(self.transform.init(tuple(self.tensors)))
        if not isinstance(state, list) or len(state) != structure.num_leaves:
            raise ValueError(
                "state_dict: the optimiser state does not match this torchopt optimiser (expected "
                f"{structure.num_leaves} leaves); resume with the same optimiser as the saved run."
            )
        self.state = torchopt.pytree.tree_unflatten(structure, [_cloned(x) for x in state])


def training_gradient(loss: Callable[..., torch.Tensor], params: Any, *rest: Any) -> Any:
    """`d loss(params, *rest) / d params` by plain autograd, as a tree like `params`.

    Not `torch.func.grad`: under it torch skips fused CPU backward kernels (an LSTM's backward
    pass measured 35 ms against 9 ms with autograd), and the loop runs outside any transform.
    """
    flat, spec = pytree.tree_flatten(params)
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in flat]
        value = loss(pytree.tree_unflatten(inputs, spec), *rest)
        if value.requires_grad:
            grads = torch.autograd.grad(value, inputs, materialize_grads=True)
        else:  # the loss does not depend on the parameters
            grads = tuple(torch.zeros_like(t) for t in inputs)
    return pytree.tree_unflatten(list(grads), spec)
