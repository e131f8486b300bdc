"""The solver interface, its input checks, the one judge of a solve and the one solver loop."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from implicitfn._operator import AbstractLinearOperator
from implicitfn._solution import Outcome, SolveInfo, all_finite, concrete, under_transform
from implicitfn._tree import (
    Tree,
    describe,
    key_paths,
    leaves,
    same_structure,
    tree_norm,
    tree_sub,
    tree_where,
    tree_zeros_like,
)

State = Any
# Restarts after the recursive residual drifted from the true one; one is almost always enough.
_MAX_RESTARTS = 3


class AbstractLinearSolver(abc.ABC):
    r"""Solves $A x = b$ (or $A^\top x = b$) for a linear operator $A$ on trees.

    A solver is a frozen dataclass holding configuration only, with at least the fields
    `rtol: float` and `atol: float` (both $\ge 0$). It implements up to three steps, in the
    shape of lineax's solvers:

    - `init(operator) -> state`: work that depends on the operator only (a factorisation, a
      sketch, a step size), done once and shared by every right-hand side. The default keeps
      the operator itself.
    - `transpose(state, operator) -> state`: the state for $A^\top$, reusing what it can. The
      default: `state` for a solver that needs a symmetric operator, else
      `init(operator.transpose())`.
    - `compute(state, vector, initial) -> (x, residual, event, num_steps)`: the solve.
      `residual` is the tree $b - A x$ where the method knows it exactly, else `None` (the base
      class then measures it with one product); `event` is an [`Outcome`][implicitfn.Outcome]
      code for something the method detected (`NEGATIVE_CURVATURE`, `BREAKDOWN`, `SINGULAR`),
      `Outcome.SUCCESSFUL` when nothing happened; `num_steps` the operator products spent.
      It must not branch in Python on tensor values, so that it runs under `torch.func.vmap`.

    [`solve`][implicitfn.AbstractLinearSolver.solve] checks the inputs, runs the three, and
    judges the result by the measured residual: the same test for every solver.

    Capabilities, declared as class attributes, let callers check a solver against a problem:
    `needs_symmetric` (checked by `solve` against the operator's tags),
    `needs_positive_definite`, `residual_growth_is_divergence` (the method is a stationary
    iteration or a fixed approximation whose residual above $\lVert b\rVert$ means it diverged
    or is misconfigured, reported as `DIVERGED`; not so for CG, whose residual may grow while
    its error shrinks), `accepts_preconditioner` (a `preconditioner` field that takes a
    callable `r -> M^{-1} r`, which a reused
    [`NystromPreconditioner`][implicitfn.NystromPreconditioner] fills in), and the property
    `fixed_steps` (the cost is fixed by the configuration: no data-dependent stopping, so
    `torch.compile` can trace the solve as one graph).

    ```python
    >>> import dataclasses, torch, implicitfn
    >>> @dataclasses.dataclass(frozen=True)
    ... class Jacobi(implicitfn.AbstractLinearSolver):
    ...     '''x_{k+1} = x_k + D^{-1} (b - A x_k), D the diagonal of a plain-tensor operator.'''
    ...     diagonal: torch.Tensor
    ...     max_steps: int = 50
    ...     rtol: float = 1e-6
    ...     atol: float = 0.0
    ...     def compute(self, operator, vector, initial):
    ...         x = implicitfn.tree_zeros_like(vector)
    ...         for _ in range(self.max_steps):
    ...             x = implicitfn.tree_axpy(1.0, (vector - operator.mv(x)) / self.diagonal, x)
    ...         return x, None, implicitfn.Outcome.SUCCESSFUL, self.max_steps
    >>> M = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(2), tags={"symmetric"})
    >>> x, info = Jacobi(torch.diagonal(M)).solve(op, torch.tensor([1.0, 2.0]))
    >>> x, info.outcome_names()
    (tensor([0.0909, 0.6364]), ['successful'])
    ```
    """

    needs_symmetric: ClassVar[bool] = False
    needs_positive_definite: ClassVar[bool] = False
    residual_growth_is_divergence: ClassVar[bool] = False
    accepts_preconditioner: ClassVar[bool] = False
    rtol: float
    atol: float

    @property
    def fixed_steps(self) -> bool:
        """Whether the cost is fixed by the configuration (no data-dependent stopping)."""
        return False

    def init(self, operator: AbstractLinearOperator) -> State:
        """The state for solving with `operator`, shared by all right-hand sides."""
        return operator

    def transpose(self, state: State, operator: AbstractLinearOperator) -> State:
        r"""The state for solving with $A^\top$, given the `state` of $A$ = `operator`."""
        return state if self.needs_symmetric else self.init(operator.transpose())

    @abc.abstractmethod
    def compute(
        self, state: State, vector: Tree, initial: Tree | None
    ) -> tuple[Tree, Tree | None, torch.Tensor | int, torch.Tensor | int]:
        """`(x, residual or None, event, num_steps)` for the right-hand side `vector`."""

    def solve(
        self,
        operator: AbstractLinearOperator,
        vector: Tree,
        initial: Tree | None = None,
        *,
        transpose: bool = False,
    ) -> tuple[Tree, SolveInfo]:
        r"""Solve `operator @ x = vector`, or `operator.T @ x = vector` with `transpose=True`.

        **Arguments:**

        - `operator`: an [`AbstractLinearOperator`][implicitfn.AbstractLinearOperator].
        - `vector`: the right-hand side $b$, a tree with the operator's structure.
        - `initial`: a starting guess for $x$ (warm start); zeros when omitted. Solvers that do
          not iterate ignore it.
        - `transpose`: solve with $A^\top$ (through
          [`transpose`][implicitfn.AbstractLinearSolver.transpose], which reuses the state of
          $A$ where it can: Dense solves with the same factorisation).

        **Returns:** `(x, info)` with `info` a [`SolveInfo`][implicitfn.SolveInfo]. Misuse
        raises `TypeError` or `ValueError` before any product. A batch of right-hand sides is
        solved with `torch.func.vmap(lambda b: solver.solve(op, b))`.

        ```python
        >>> import torch, implicitfn
        >>> M = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
        >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(2),
        ...                                       transpose_matvec=lambda u: M.T @ u)
        >>> x, info = implicitfn.GMRES().solve(op, torch.tensor([3.0, 1.0]), transpose=True)
        >>> x, info.outcome_names()
        (tensor([ 1.5000, -0.5000]), ['successful'])
        ```
        """
        if not isinstance(operator, AbstractLinearOperator):
            raise TypeError(
                f"operator: expected an implicitfn.AbstractLinearOperator, got "
                f"{type(operator).__name__}; wrap a function with implicitfn.FunctionLinearOperator."
            )
        check_vector(vector, operator.template, "vector")
        if initial is not None:
            check_vector(initial, operator.template, "initial")
        check_tolerances(self)
        if self.needs_symmetric and not operator.is_symmetric:
            raise ValueError(
                f"{type(self).__name__} needs a symmetric operator, but this one is not tagged "
                "'symmetric' (a fixed-point or general root condition has a non-symmetric "
                "Jacobian). Use implicitfn.GMRES(), implicitfn.FixedPoint() or "
                "implicitfn.Dense() instead."
            )
        # Raises here, before any product, when the operator has no transpose.
        applied = operator.transpose() if transpose else operator
        state = self.init(operator)
        if transpose:
            state = self.transpose(state, operator)
        x, residual, event, num_steps = self.compute(state, vector, initial)
        if not same_structure(x, vector):
            raise TypeError(
                f"{type(self).__name__}.compute returned a solution with structure "
                f"{describe(x)}; it must match the right-hand side's {describe(vector)}."
            )
        if residual is not None:  # the method knows its exact residual
            return x, judge(self, x, residual, vector, event, num_steps)
        info = judge(self, x, tree_sub(vector, applied.mv(x)), vector, event, num_steps)
        return self._continue_after_drift(state, applied, vector, x, info)

    def _continue_after_drift(
        self, state: State, operator: AbstractLinearOperator, vector: Tree, x: Tree, info: SolveInfo
    ) -> tuple[Tree, SolveInfo]:
        """Restart from `x` while the measured residual misses the tolerance that the method's
        own estimate said it met, and budget is left.

        CG, MINRES and GMRES stop on a recursive estimate of the residual, which drifts from
        the true one in finite precision (measured: a float32 CG stopped at a true relative
        residual of 1.1e-4 for a tolerance of 1e-4). Restarting from the current iterate
        replaces the estimate by the true residual (one product), as residual-replacement
        schemes do. Solves that ran their budget, or were asked for a fixed number of steps, are
        not restarted; nor is a compiled solve (its step count is fixed).
        """
        budget = getattr(self, "max_steps", None)
        if budget is None or self.fixed_steps or torch.compiler.is_compiling():
            return x, info
        for _ in range(_MAX_RESTARTS):
            spent = int(concrete(info.num_steps).max())
            drifted = concrete(info.outcome) == int(Outcome.MAX_STEPS_REACHED)
            if spent >= budget or not bool(drifted.any()):
                break
            rest = dataclasses.replace(self, max_steps=budget - spent)
            more, _, event, steps = rest.compute(state, vector, x)
            total = info.num_steps + steps  # every member of a vmapped batch spent them
            again = judge(self, more, tree_sub(vector, operator.mv(more)), vector, event, total)
            improved = again.residual_norm < info.residual_norm
            x = tree_where(improved, more, x)
            info = tree_where(improved, again, dataclasses.replace(info, num_steps=total))
            if not bool(concrete(improved).any()):
                break
        stuck = (info.outcome == int(Outcome.MAX_STEPS_REACHED)) & (info.num_steps < budget)
        outcome = torch.where(
            stuck, torch.full_like(info.outcome, int(Outcome.STAGNATED)), info.outcome
        )
        return x, dataclasses.replace(info, outcome=outcome)


def judge(
    solver: AbstractLinearSolver,
    x: Tree,
    residual: Tree,
    vector: Tree,
    event: torch.Tensor | int,
    num_steps: torch.Tensor | int,
) -> SolveInfo:
    """The outcome of a solve from its measured residual: one test for every solver.

    NONFINITE if the residual or `x` has NaN/Inf, else SUCCESSFUL if the residual meets the
    tolerance, else the method's `event` if it reported one, else DIVERGED if the residual
    exceeds |b| and the solver declares `residual_growth_is_divergence`, else
    MAX_STEPS_REACHED. Only `torch.where`: vmap-safe. The entries are checked,
    not the norm: a finite residual whose norm overflows has diverged.
    """
    residual_norm = tree_norm(residual)
    rhs_norm = tree_norm(vector)
    tolerance = torch.clamp(solver.rtol * rhs_norm, min=solver.atol)

    def code(value: torch.Tensor | int) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.to(dtype=torch.int64, device=residual_norm.device)
        return torch.full((), int(value), dtype=torch.int64, device=residual_norm.device)

    event = code(event)
    grew = residual_norm > rhs_norm
    if not solver.residual_growth_is_divergence:
        grew = torch.zeros_like(grew)
    outcome = torch.where(grew, code(Outcome.DIVERGED), code(Outcome.MAX_STEPS_REACHED))
    # int(): under torch.compile, `tensor != IntEnum member` becomes a Python bool.
    outcome = torch.where(event != int(Outcome.SUCCESSFUL), event, outcome)
    outcome = torch.where(residual_norm <= tolerance, code(Outcome.SUCCESSFUL), outcome)
    finite = torch.ones_like(residual_norm, dtype=torch.bool)
    for leaf in leaves(x) + leaves(residual):
        finite = finite & torch.isfinite(leaf).all()
    outcome = torch.where(finite, outcome, code(Outcome.NONFINITE))
    return SolveInfo(
        outcome, residual_norm, rhs_norm, tolerance, code(num_steps), type(solver).__name__
    )


def initial_residual(
    operator: AbstractLinearOperator, vector: Tree, initial: Tree | None
) -> tuple[Tree, Tree, int]:
    """`(x0, b - A x0, products)`: zeros and `b` without a warm start, else one product."""
    if initial is None:
        return tree_zeros_like(vector), vector, 0
    return initial, tree_sub(vector, operator.mv(initial)), 1


def step_count(products: int, vector: Tree) -> torch.Tensor:
    """The int64 counter of operator products, on the device of `vector`, starting at `products`."""
    return torch.tensor(products, dtype=torch.int64, device=leaves(vector)[0].device)


def check_vector(vector: Tree, template: Tree, name: str) -> None:
    flat = leaves(vector)
    if not flat or not all(isinstance(leaf, torch.Tensor) for leaf in flat):
        raise TypeError(
            f"{name}: expected a TensorDict, dict of tensors or tensor, got {type(vector).__name__}."
        )
    if not same_structure(vector, template):
        reordered = sorted(key_paths(vector)) == sorted(key_paths(template))
        raise ValueError(
            f"{name}: structure {describe(vector)} does not match the operator's "
            f"{describe(template)}; pass a tree with the same keys and shapes as the parameters"
            + (", in the same order." if reordered else ".")
        )
    bad = [leaf.dtype for leaf in flat if not leaf.is_floating_point()]
    if bad:
        raise TypeError(
            f"{name}: leaves must be floating point, got {bad[0]}; convert with .float()."
        )
    # Reading values would break a compiled graph; there, NaN/Inf shows as Outcome.NONFINITE.
    if not torch.compiler.is_compiling() and not all_finite(vector):
        raise ValueError(f"{name}: contains NaN or Inf; the right-hand side must be finite.")


def check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}.")
    if value <= 0:
        raise ValueError(f"{name}: must be a positive number of steps (got {value}).")


def check_tolerances(solver: AbstractLinearSolver) -> None:
    """`rtol` and `atol`: numbers >= 0 (`None` was the old spelling of a fixed step count)."""
    for name in ("rtol", "atol"):
        if not hasattr(solver, name):
            raise TypeError(
                f"{type(solver).__name__}: a solver needs the fields rtol and atol (floats >= 0) "
                "by which its solves are judged."
            )
        value = getattr(solver, name)
        if value is None:
            raise TypeError(
                f"{name}: None is not accepted; use rtol=0 for a fixed number of steps "
                "(with atol=0), or a float > 0 to stop at a tolerance."
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a float >= 0, got {type(value).__name__}.")
        if not value >= 0:
            raise ValueError(f"{name}: expected a float >= 0, got {value!r}.")


def runs_its_budget(solver: AbstractLinearSolver) -> bool:
    """`fixed_steps` of an iterative solver: no tolerance to stop at (rtol == atol == 0)."""
    return solver.rtol == 0 and solver.atol == 0


def stopping_rule(
    solver: AbstractLinearSolver, vector: Tree
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`stop(estimate)`: whether a residual estimate meets the tolerance or is NaN; None for a
    fixed number of steps (rtol = atol = 0), which then need no check at all."""
    if runs_its_budget(solver):
        return None
    tolerance = torch.clamp(solver.rtol * tree_norm(vector), min=solver.atol)
    return lambda estimate: ~(estimate > tolerance)


def safe_divisor(value: torch.Tensor) -> torch.Tensor:
    """`value` where it is non-zero, else 1: a divisor that never makes NaN (vmap-safe)."""
    return torch.where(value == 0, torch.ones_like(value), value)


def iterate(
    step: Callable[[State], State],
    done: Callable[[State], torch.Tensor] | None,
    state: State,
    max_steps: int,
) -> State:
    """Run `step` until `done(state)` or `max_steps`; the only loop the solvers use.

    With `done=None` it runs exactly `max_steps` (no value is read: one graph for
    `torch.compile`, no device synchronisation). Eagerly it stops early. Under `torch.func`
    transforms a Python branch on a tensor value is impossible (vmap), and under
    `torch.compile` it would break the graph, so it then freezes the state of every solve that
    is done and steps the rest; it stops when all of a batch are done (read through the
    functorch wrappers; compiled code runs all `max_steps`). The result is the same either way.
    """
    if done is None:
        for _ in range(max_steps):
            state = step(state)
        return state
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
