"""The solver interface, input checks and the one loop that every iterative solver uses."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch

from implicitfn._operator import AbstractLinearOperator
from implicitfn._solution import SolveInfo, all_finite, concrete, under_transform
from implicitfn._tree import Tree, describe, leaves, same_structure, tree_where

State = tuple[Any, ...]


class AbstractLinearSolver(abc.ABC):
    r"""Solves $A x = b$ for a linear operator $A$ on trees.

    Subclasses are frozen dataclasses holding configuration only, and implement `_solve`;
    [`solve`][implicitfn.AbstractLinearSolver.solve] checks the inputs first. Set
    `requires_symmetric = True` when the method is only valid for symmetric operators.

    ```python
    >>> import torch, implicitfn
    >>> op = implicitfn.FunctionLinearOperator(lambda v: 4 * v, torch.zeros(2), tags={"symmetric"})
    >>> x, info = implicitfn.Dense().solve(op, torch.ones(2))
    >>> x
    tensor([0.2500, 0.2500])
    ```
    """

    requires_symmetric: bool = False

    def solve(
        self, operator: AbstractLinearOperator, vector: Tree, initial: Tree | None = None
    ) -> tuple[Tree, SolveInfo]:
        """Solve `operator @ x = vector`.

        **Arguments:**

        - `operator`: an [`AbstractLinearOperator`][implicitfn.AbstractLinearOperator].
        - `vector`: the right-hand side $b$, a tree with the operator's structure.
        - `initial`: a starting guess for $x$ (warm start); zeros when omitted. Solvers that do
          not iterate ignore it.

        **Returns:** `(x, info)` with `info` a [`SolveInfo`][implicitfn.SolveInfo]. A batch of
        right-hand sides is solved with `torch.func.vmap(lambda b: solver.solve(op, b))`.
        """
        if not isinstance(operator, AbstractLinearOperator):
            raise TypeError(
                f"operator: expected an implicitfn.AbstractLinearOperator, got "
                f"{type(operator).__name__}; wrap a function with implicitfn.FunctionLinearOperator."
            )
        check_vector(vector, operator.template, "vector")
        if initial is not None:
            check_vector(initial, operator.template, "initial")
        if self.requires_symmetric and not operator.is_symmetric:
            raise ValueError(
                f"{type(self).__name__} needs a symmetric operator, but this one is not tagged "
                "'symmetric' (a fixed-point or general root condition has a non-symmetric "
                "Jacobian). Use implicitfn.FixedPoint(), implicitfn.Dense() or "
                "implicitfn.Identity() instead."
            )
        return self._solve(operator, vector, initial)

    @abc.abstractmethod
    def _solve(
        self, operator: AbstractLinearOperator, vector: Tree, initial: Tree | None
    ) -> tuple[Tree, SolveInfo]:
        """Solve after the inputs were checked."""


def check_vector(vector: Tree, template: Tree, name: str) -> None:
    flat = leaves(vector)
    if not flat or not all(isinstance(leaf, torch.Tensor) for leaf in flat):
        raise TypeError(
            f"{name}: expected a TensorDict, dict of tensors or tensor, got {type(vector).__name__}."
        )
    if not same_structure(vector, template):
        raise ValueError(
            f"{name}: structure {describe(vector)} does not match the operator's "
            f"{describe(template)}; pass a tree with the same keys and shapes as the parameters."
        )
    bad = [leaf.dtype for leaf in flat if not leaf.is_floating_point()]
    if bad:
        raise TypeError(
            f"{name}: leaves must be floating point, got {bad[0]}; convert with .float()."
        )
    if not all_finite(vector):
        raise ValueError(f"{name}: contains NaN or Inf; the right-hand side must be finite.")


def check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}.")
    if value <= 0:
        raise ValueError(f"{name}: must be a positive number of steps (got {value}).")


def check_tolerance(value: Any, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(
            f"{name}: expected a float >= 0{' or None' if allow_none else ''}, got {value!r}."
        )


def safe_divisor(value: torch.Tensor) -> torch.Tensor:
    """`value` where it is non-zero, else 1: a divisor that never makes NaN (vmap-safe)."""
    return torch.where(value == 0, torch.ones_like(value), value)


def tolerance(rhs_norm: torch.Tensor, rtol: float | None, atol: float) -> torch.Tensor:
    """The residual norm below which a solve counts as converged."""
    relative = 0.0 if rtol is None else rtol
    return torch.clamp(relative * rhs_norm, min=atol)


def reduces_residual(residual: torch.Tensor, rhs_norm: torch.Tensor) -> torch.Tensor:
    """`converged` of a solve without a tolerance: a finite residual below |b| (or 0 when b = 0)."""
    return torch.isfinite(residual) & ((residual < rhs_norm) | (residual == 0))


def iterate(
    step: Callable[[State], State],
    done: Callable[[State], torch.Tensor],
    state: State,
    max_steps: int,
) -> State:
    """Run `step` until `done(state)` or `max_steps`; the only loop the solvers use.

    Eagerly it stops early. Under `torch.func` transforms a Python branch on a tensor value is
    impossible (vmap), and under `torch.compile` it would break the graph, so it then freezes
    the state of every solve that is done and steps the rest; it stops when all of a batch are
    done (read through the functorch wrappers; compiled code runs all `max_steps`). The result
    is the same either way.
    """
    if not under_transform() and not torch.compiler.is_compiling():
        for _ in range(max_steps):
            if bool(done(state)):
                break
            state = step(state)
        return state
    compiling = torch.compiler.is_compiling()
    for _ in range(max_steps):
        finished = done(state)
        # Reading the flags through the wrappers stops a batch once every solve in it is done.
        if not compiling and bool(concrete(finished).all()):
            break
        state = tree_where(finished, state, step(state))
    return state
