from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from implicitfn._linear_solve._base import (
    AbstractLinearSolver,
    check_positive_int,
    reduces_residual,
)
from implicitfn._linear_solve._estimates import StepSize, check_step_size, step_size
from implicitfn._operator import AbstractLinearOperator, AbstractWrappedOperator
from implicitfn._solution import SolveInfo
from implicitfn._tree import Tree, tree_add, tree_axpy, tree_norm, tree_scale, tree_sub


@dataclasses.dataclass(frozen=True)
class ResamplingOperator(AbstractWrappedOperator):
    r"""An operator $A$ that can also be rebuilt on other data, $A_{\mathrm{batch}}$.

    [`implicit_diff`][implicitfn.implicit_diff] and [`hypergradient`][implicitfn.hypergradient]
    give every solver one of these: it is the Jacobian of the optimality condition on the
    arguments the inner problem was solved with, and [`at`][implicitfn.ResamplingOperator.at]
    builds the same Jacobian at the same point $(w^*, \lambda)$ with the condition's extra
    arguments replaced by a batch (with the same damping and transposition). Solvers that do not
    resample use it as an ordinary operator. Build one to call
    [`StochasticNeumann`][implicitfn.StochasticNeumann] directly.

    **Arguments:**

    - `operator`: $A$ (on all the data).
    - `linearize`: `(*batch) -> AbstractLinearOperator`, the operator on a batch, with the
      structure and tags of `operator`.

    ```python
    >>> import torch, implicitfn
    >>> def hessian_on(x):                      # curvature of a least-squares loss on rows x
    ...     return implicitfn.FunctionLinearOperator(lambda v: x.T @ (x @ v) / len(x),
    ...                                         torch.zeros(2), tags={"symmetric"})
    >>> data = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> op = implicitfn.ResamplingOperator(hessian_on(data), hessian_on)
    >>> op.mv(torch.ones(2)), op.at((data[:1],)).mv(torch.ones(2))
    (tensor([0.5000, 2.0000]), tensor([1., 0.]))
    ```
    """

    operator: AbstractLinearOperator
    linearize: Callable[..., AbstractLinearOperator]

    def __post_init__(self) -> None:
        if not isinstance(self.operator, AbstractLinearOperator):
            raise TypeError(
                f"operator: expected an AbstractLinearOperator, got {type(self.operator).__name__}."
            )
        if not callable(self.linearize):
            raise TypeError(
                "linearize: expected a callable (*batch) -> AbstractLinearOperator, got "
                f"{type(self.linearize).__name__}."
            )

    def mv(self, vector: Tree) -> Tree:
        return self.operator.mv(vector)

    def transpose(self) -> AbstractLinearOperator:
        linearize = self.linearize
        return ResamplingOperator(
            self.operator.transpose(), lambda *batch: linearize(*batch).transpose()
        )

    def at(self, batch: Any) -> AbstractLinearOperator:
        """The operator on `batch`: a tuple or list is spread as the condition's `*args`, any
        other object is its single extra argument."""
        args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        operator = self.linearize(*args)
        if not isinstance(operator, AbstractLinearOperator):
            raise TypeError(
                f"linearize: must return an AbstractLinearOperator, got {type(operator).__name__}."
            )
        return operator


@dataclasses.dataclass(frozen=True)
class StochasticNeumann(AbstractLinearSolver):
    r"""Neumann series with a fresh minibatch per term (LiSSA; Agarwal, Bullins & Hazan, 2017).

    The recursion $v_0 = b$, $v_j = b + (I - \alpha A_j)\,v_{j-1}$, $x = \alpha v_k$, where
    $A_j$ is the curvature on the $j$-th batch drawn from `batches`. With every $A_j = A$ it is
    exactly [`Neumann`][implicitfn.Neumann]; with minibatches it is an unbiased-in-each-factor
    estimate of the same series that sees $k$ batches instead of one, so the backward pass can
    use more data than fits in one batch. It converges in expectation when
    $\alpha < 2/\lambda_{\max}(A_j)$ for every batch; its variance grows with $\alpha$ and with
    the spread between batches.

    The solver needs an operator that can be re-linearised per batch: a
    [`ResamplingOperator`][implicitfn.ResamplingOperator], which
    [`implicit_diff`][implicitfn.implicit_diff] and [`hypergradient`][implicitfn.hypergradient]
    provide (the batch replaces the condition's `*args`, at the same $w^*$ and $\lambda$).
    The reported residual is the exact $\lVert b - A x\rVert$ on the full operator (one extra
    product), and `converged` means it is finite and below $\lVert b\rVert$.

    Unlike the other solvers this one holds data: `batches` is read at every solve (`iter()` is
    called on it each time, so a list or a `DataLoader` restarts from its beginning, and
    restarts again if it runs out; a one-shot iterator such as `itertools.cycle(loader)` keeps
    drawing fresh batches across solves and raises `ValueError` if it is exhausted). Under
    `torch.func.vmap` a batch is drawn once per term for the whole vmapped batch.

    **Arguments:**

    - `batches`: an iterable of batches; each batch is a tuple or list of the condition's extra
      arguments (`(x, y)` for a loss `loss(params, hparams, x, y)`), or a single object for a
      condition with one extra argument.
    - `steps`: $k$, the number of terms after the first (one batch and one product each).
    - `alpha`: the step, or `"auto"` (default): $1/\hat\lambda_{\max}$ estimated on the full
      operator by `power_steps` products of power iteration (counted in `num_steps`). A small
      batch can have a larger top eigenvalue than the full data: if the series diverges (it is
      reported), pass a smaller explicit `alpha`.
    - `power_steps`: the power-iteration products for `alpha="auto"`.

    ```python
    >>> import torch, implicitfn
    >>> x = torch.randn(64, 3, dtype=torch.float64)
    >>> def curvature_on(rows):
    ...     return implicitfn.FunctionLinearOperator(
    ...         lambda v: rows.T @ (rows @ v) / len(rows), torch.zeros(3, dtype=rows.dtype),
    ...         tags={"symmetric"})
    >>> operator = implicitfn.ResamplingOperator(curvature_on(x), curvature_on)
    >>> solver = implicitfn.StochasticNeumann(batches=list(x.split(16)), steps=100)
    >>> v, info = solver.solve(operator, torch.ones(3, dtype=torch.float64))
    >>> bool(info.converged), int(info.num_steps)            # 10 power steps + 100 terms
    (True, 110)
    ```
    """

    batches: Iterable[Any] = dataclasses.field(repr=False, compare=False)
    steps: int = 20
    alpha: StepSize = "auto"
    power_steps: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.batches, (torch.Tensor, str, dict)) or not isinstance(
            self.batches, Iterable
        ):
            raise TypeError(
                "batches: expected an iterable of argument tuples (a list of batches, a "
                f"DataLoader, itertools.cycle(loader)), got {type(self.batches).__name__}."
            )
        check_positive_int(self.steps, "steps")
        check_step_size(self.alpha, self.power_steps)

    def _draws(self) -> Iterator[Any]:
        """The batches for one solve: a re-iterable restarts when it runs out."""
        one_shot = isinstance(self.batches, Iterator)
        drawn = 0
        while True:
            empty = True
            for batch in self.batches:
                empty = False
                drawn += 1
                yield batch
            if empty or one_shot:
                raise ValueError(
                    f"batches: ran out after {drawn} batch(es) in this solve, which needs "
                    f"{self.steps}; pass a re-iterable (a list, a DataLoader) or an endless "
                    "iterator such as itertools.cycle(loader)."
                )

    def _solve(self, operator, vector, initial):
        if not isinstance(operator, ResamplingOperator):
            raise TypeError(
                "operator: StochasticNeumann needs an implicitfn.ResamplingOperator, which can "
                f"be rebuilt on each batch, got {type(operator).__name__}; use it through "
                "implicit_diff or hypergradient, or wrap: ResamplingOperator(operator, linearize)."
            )
        alpha, estimate_products = step_size(self.alpha, operator, self.power_steps)
        rhs = vector if initial is None else tree_sub(vector, operator.mv(initial))
        draws = self._draws()
        total = rhs
        for _ in range(self.steps):
            batch_operator = operator.at(next(draws))
            total = tree_add(rhs, tree_axpy(-alpha, batch_operator.mv(total), total))
        x = tree_scale(alpha, total)
        if initial is not None:
            x = tree_add(x, initial)
        residual = tree_norm(tree_sub(vector, operator.mv(x)))
        rhs_norm = tree_norm(vector)
        steps = torch.tensor(self.steps + estimate_products, device=residual.device)
        converged = reduces_residual(residual, rhs_norm)
        return x, SolveInfo(residual, rhs_norm, steps, converged, "StochasticNeumann")
