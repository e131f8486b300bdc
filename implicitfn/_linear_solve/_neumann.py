from __future__ import annotations

import dataclasses

from implicitfn._linear_solve._estimates import StepSize
from implicitfn._linear_solve._fixed_point import FixedPoint


@dataclasses.dataclass(frozen=True)
class Neumann(FixedPoint):
    r"""Truncated Neumann series (Lorraine, Vicol & Duvenaud, 2020).

    $A^{-1} b \approx \alpha \sum_{j=0}^{k-1} (I - \alpha A)^j b$ after $k$ products, which
    converges when $0 < \alpha < 2/\lambda_{\max}(A)$ and $A$ is positive definite; it is $k$
    steps of gradient descent on $\tfrac12 x^\top A x - b^\top x$ from zero. Each product both
    adds a term and gives the exact residual $b - Ax = (I - \alpha A)^{k} b$ of the partial sum,
    so the residual in [`SolveInfo`][implicitfn.SolveInfo] costs nothing extra, and with a
    tolerance the series stops as soon as it is met. An $\alpha$ above $2/\lambda_{\max}$ makes
    the series diverge: that is reported as `Outcome.DIVERGED`, not hidden.

    **Arguments:**

    - `max_steps`: $k$, the number of terms (operator products).
    - `alpha`: the step $\alpha > 0$, or `"auto"`: $\alpha = 1/\hat\lambda_{\max}$ from
      `power_steps` products of power iteration (a lower estimate of $\lambda_{\max}$, so the
      step stays below $2/\lambda_{\max}$ unless the estimate is off by more than a factor 2).
      Those products are counted in `num_steps`.
    - `rtol`, `atol`: the default `rtol=0, atol=0` sums exactly `max_steps` terms (the
      paper's fixed budget; reaching it is then not a failure); a tolerance stops the sum early
      and is judged as for every solver.
    - `power_steps`: the power-iteration products for `alpha="auto"` (ignored otherwise).

    ```python
    >>> import torch, implicitfn
    >>> op = implicitfn.FunctionLinearOperator(lambda v: 0.5 * v, torch.zeros(1), tags={"symmetric"})
    >>> x, info = implicitfn.Neumann(max_steps=10, alpha=1.0).solve(op, torch.ones(1))
    >>> x, info.outcome_names(), bool(info.failed)   # 2 (1 - 2^-10), as asked
    (tensor([1.9980]), ['max_steps_reached'], False)
    >>> x, info = implicitfn.Neumann(max_steps=50, alpha=1.0, rtol=1e-3).solve(op, torch.ones(1))
    >>> info.outcome_names(), int(info.num_steps)           # stops at 2^-10 < 1e-3
    (['successful'], 10)
    >>> big = implicitfn.FunctionLinearOperator(lambda v: 50 * v, torch.zeros(1),
    ...                                        tags={"symmetric"})
    >>> implicitfn.Neumann(alpha=1.0).solve(big, torch.ones(1))[1].outcome_names()
    ['diverged']
    >>> x, info = implicitfn.Neumann(alpha="auto").solve(big, torch.ones(1))
    >>> x, int(info.num_steps)                               # 10 power steps + 20 terms
    (tensor([0.0200]), 30)
    ```
    """

    # The fields and the iteration are FixedPoint's; the defaults (a fixed budget, as in the
    # paper) and the declared need for a positive spectrum are Neumann's.
    max_steps: int = 20
    alpha: StepSize = 1.0
    rtol: float = 0.0
    needs_positive_definite = True
