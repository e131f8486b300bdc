from __future__ import annotations

import dataclasses

import torch

from implicitfn._linear_solve._base import (
    AbstractLinearSolver,
    check_positive_int,
    reduces_residual,
)
from implicitfn._linear_solve._estimates import StepSize, check_step_size, step_size
from implicitfn._solution import SolveInfo
from implicitfn._tree import tree_add, tree_axpy, tree_norm, tree_scale, tree_sub


@dataclasses.dataclass(frozen=True)
class Neumann(AbstractLinearSolver):
    r"""Truncated Neumann series (Lorraine, Vicol & Duvenaud, 2020).

    $A^{-1} b \approx \alpha \sum_{j=0}^{k} (I - \alpha A)^j b$, which converges when
    $0 < \alpha < 2/\lambda_{\max}(A)$ and $A$ is positive definite; it is $k$ steps of gradient
    descent on $\tfrac12 x^\top A x - b^\top x$ from zero. Its residual is exactly
    $(I - \alpha A)^{k+1} b$, computed with one extra product and reported in
    [`SolveInfo`][implicitfn.SolveInfo]. It counts as converged when that residual is finite
    and smaller than $\lVert b\rVert$; an $\alpha$ above $2/\lambda_{\max}$ makes the series
    diverge and is reported, not returned.

    **Arguments:**

    - `steps`: $k$, the number of terms after the first (operator products).
    - `alpha`: the step $\alpha > 0$, or `"auto"`: $\alpha = 1/\hat\lambda_{\max}$ from
      `power_steps` products of power iteration (a lower estimate of $\lambda_{\max}$, so the
      step stays below $2/\lambda_{\max}$ unless the estimate is off by more than a factor 2).
      Those products are counted in `num_steps`.
    - `power_steps`: the power-iteration products for `alpha="auto"` (ignored otherwise).

    ```python
    >>> import torch, implicitfn
    >>> op = implicitfn.FunctionLinearOperator(lambda v: 0.5 * v, torch.zeros(1), tags={"symmetric"})
    >>> x, info = implicitfn.Neumann(steps=50, alpha=1.0).solve(op, torch.ones(1))
    >>> x, bool(info.converged)
    (tensor([2.]), True)
    >>> big = implicitfn.FunctionLinearOperator(lambda v: 50 * v, torch.zeros(1),
    ...                                        tags={"symmetric"})
    >>> bool(implicitfn.Neumann(alpha=1.0).solve(big, torch.ones(1))[1].converged)
    False
    >>> x, info = implicitfn.Neumann(alpha="auto").solve(big, torch.ones(1))
    >>> x, bool(info.converged), int(info.num_steps)
    (tensor([0.0200]), True, 30)
    ```
    """

    steps: int = 20
    alpha: StepSize = 1.0
    power_steps: int = 10

    def __post_init__(self) -> None:
        check_positive_int(self.steps, "steps")
        check_step_size(self.alpha, self.power_steps)

    def _solve(self, operator, vector, initial):
        alpha, estimate_products = step_size(self.alpha, operator, self.power_steps)
        # Series on the initial residual: x = x0 + alpha * sum_j (I - alpha A)^j (b - A x0).
        rhs = vector if initial is None else tree_sub(vector, operator.mv(initial))
        term = rhs
        total = rhs
        for _ in range(self.steps):
            term = tree_axpy(-alpha, operator.mv(term), term)
            total = tree_add(total, term)
        residual_tree = tree_axpy(-alpha, operator.mv(term), term)
        x = tree_scale(alpha, total)
        if initial is not None:
            x = tree_add(x, initial)
        residual = tree_norm(residual_tree)
        rhs_norm = tree_norm(vector)
        converged = reduces_residual(residual, rhs_norm)
        steps = torch.tensor(self.steps + estimate_products, device=residual.device)
        return x, SolveInfo(residual, rhs_norm, steps, converged, "Neumann")
