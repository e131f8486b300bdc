from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from implicitfn._linear_solve._base import (
    check_positive_int,
    check_tolerances,
    initial_residual,
    step_count,
)
from implicitfn._linear_solve._estimates import (
    AbstractStepSizeSolver,
    StepSize,
    check_step_size,
)
from implicitfn._operator import ResamplingOperator
from implicitfn._solution import Outcome
from implicitfn._tree import tree_add, tree_axpy


@dataclasses.dataclass(frozen=True)
class StochasticNeumann(AbstractStepSizeSolver):
    r"""Neumann series with a fresh minibatch per term (LiSSA; Agarwal, Bullins & Hazan, 2017).

    The recursion $v_0 = b$, $v_j = b + (I - \alpha A_j)\,v_{j-1}$, $x = \alpha v_k$, where
    $A_j$ is the curvature on the $j$-th batch drawn from `batches`. With every $A_j = A$ it is
    the $k + 1$ terms of [`Neumann`][implicitfn.Neumann] (`Neumann(max_steps=k + 1)`, whose
    last product gives its residual); with minibatches it is an unbiased-in-each-factor
    estimate of the same series that sees $k$ batches instead of one, so the backward pass can
    use more data than fits in one batch. It converges in expectation when
    $\alpha < 2/\lambda_{\max}(A_j)$ for every batch; its variance grows with $\alpha$ and with
    the spread between batches.

    The solver needs an operator that can be re-linearised per batch: a
    [`ResamplingOperator`][implicitfn.ResamplingOperator], which
    [`implicit_diff`][implicitfn.implicit_diff] and [`hypergradient`][implicitfn.hypergradient]
    provide (the batch replaces the condition's `*args`, at the same $w^*$ and $\lambda$).
    The reported residual is the measured $\lVert b - A x\rVert$ on the full operator (one
    extra product), judged as for every solver. It draws its batches in Python, so its cost is
    not `fixed_steps` in the sense of `torch.compile`.

    Unlike the other solvers this one holds data: `batches` is read at every solve (`iter()` is
    called on it each time, so a list or a `DataLoader` restarts from its beginning, and
    restarts again if it runs out; a one-shot iterator such as `itertools.cycle(loader)` keeps
    drawing fresh batches across solves and raises `ValueError` if it is exhausted). Under
    `torch.func.vmap` a batch is drawn once per term for the whole vmapped batch.

    **Arguments:**

    - `batches`: an iterable of batches; each batch is a tuple or list of the condition's extra
      arguments (`(x, y)` for a loss `loss(params, hparams, x, y)`), or a single object for a
      condition with one extra argument.
    - `max_steps`: $k$, the number of terms after the first (one batch and one product each);
      all are always summed.
    - `alpha`: the step, or `"auto"` (default): $1/\hat\lambda_{\max}$ estimated on the full
      operator by `power_steps` products of power iteration (counted in `num_steps`). A small
      batch can have a larger top eigenvalue than the full data: if the series diverges (it is
      reported), pass a smaller explicit `alpha`.
    - `rtol`, `atol`: the tolerance the measured residual is judged by; the default
      `rtol=0, atol=0` asks for the fixed budget only (reaching it is then not a failure).
    - `power_steps`: the power-iteration products for `alpha="auto"`.

    ```python
    >>> import torch, implicitfn
    >>> x = torch.randn(64, 3, dtype=torch.float64)
    >>> def curvature_on(rows):
    ...     return implicitfn.FunctionLinearOperator(
    ...         lambda v: rows.T @ (rows @ v) / len(rows), torch.zeros(3, dtype=rows.dtype),
    ...         tags={"symmetric"})
    >>> operator = implicitfn.ResamplingOperator(curvature_on(x), curvature_on)
    >>> solver = implicitfn.StochasticNeumann(batches=list(x.split(16)), max_steps=100)
    >>> v, info = solver.solve(operator, torch.ones(3, dtype=torch.float64))
    >>> bool(info.failed), int(info.num_steps)               # 10 power steps + 100 terms
    (False, 110)
    ```
    """

    batches: Iterable[Any] = dataclasses.field(repr=False, compare=False)
    max_steps: int = 20
    alpha: StepSize = "auto"
    rtol: float = 0.0
    atol: float = 0.0
    power_steps: int = 10
    needs_positive_definite = True
    residual_growth_is_divergence = True

    def __post_init__(self) -> None:
        if isinstance(self.batches, (torch.Tensor, str, dict)) or not isinstance(
            self.batches, Iterable
        ):
            raise TypeError(
                "batches: expected an iterable of argument tuples (a list of batches, a "
                f"DataLoader, itertools.cycle(loader)), got {type(self.batches).__name__}."
            )
        check_positive_int(self.max_steps, "max_steps")
        check_step_size(self.alpha, self.power_steps)
        check_tolerances(self)

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
                    f"{self.max_steps}; pass a re-iterable (a list, a DataLoader) or an endless "
                    "iterator such as itertools.cycle(loader)."
                )

    def init(self, operator):
        if not isinstance(operator, ResamplingOperator):
            raise TypeError(
                "operator: StochasticNeumann needs an implicitfn.ResamplingOperator, which can "
                f"be rebuilt on each batch, got {type(operator).__name__}; use it through "
                "implicit_diff or hypergradient, or wrap: ResamplingOperator(operator, linearize)."
            )
        return super().init(operator)

    def compute(self, state, vector, initial):
        operator, alpha, setup_products = state
        x, rhs, products = initial_residual(operator, vector, initial)
        draws = self._draws()
        total = rhs
        for _ in range(self.max_steps):
            batch_operator = operator.at(next(draws))
            total = tree_add(rhs, tree_axpy(-alpha, batch_operator.mv(total), total))
        x = tree_axpy(alpha, total, x)
        steps = step_count(self.max_steps + setup_products + products, vector)
        return x, None, Outcome.SUCCESSFUL, steps
