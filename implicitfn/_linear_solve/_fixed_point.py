from __future__ import annotations

import dataclasses

import torch

from implicitfn._linear_solve._base import (
    AbstractLinearSolver,
    check_positive_int,
    check_tolerance,
    iterate,
    reduces_residual,
    tolerance,
)
from implicitfn._linear_solve._estimates import StepSize, check_step_size, step_size
from implicitfn._solution import SolveInfo
from implicitfn._tree import tree_axpy, tree_norm, tree_sub, tree_zeros_like


@dataclasses.dataclass(frozen=True)
class FixedPoint(AbstractLinearSolver):
    r"""Damped fixed-point (Richardson) iteration $x \leftarrow x + \alpha\,(b - A x)$.

    Needs no symmetry: it converges when every eigenvalue $\mu$ of $A$ satisfies
    $|1 - \alpha\mu| < 1$. For a fixed-point condition $w = T(w, \lambda)$, where
    $A = I - \partial T/\partial w$, $\alpha = 1$ gives the classical iteration
    $x \leftarrow b + (\partial T/\partial w)^\top x$, which converges whenever $T$ is a
    contraction. From $x_0 = 0$ its iterates equal the [`Neumann`][implicitfn.Neumann] series;
    unlike it, this solver stops at a tolerance.

    **Arguments:**

    - `max_steps`: the most iterations (one operator product each).
    - `alpha`: the step $\alpha > 0$, or `"auto"`: $\alpha = 1/\hat\mu$ with $\hat\mu$ a
      power-iteration estimate of the largest eigenvalue magnitude of $A$, from `power_steps`
      products counted in `num_steps`. Safe for symmetric positive definite $A$; for a
      non-symmetric $A$ it is a heuristic (with complex eigenvalues near the imaginary axis no
      $\alpha$ converges), and a divergence is reported as `converged=False`.
    - `rtol`, `atol`: stop when $\lVert b - Ax\rVert \le \max(\mathrm{atol}, \mathrm{rtol}\lVert b\rVert)$;
      `rtol=None` runs exactly `max_steps` and counts as converged when the residual is finite
      and below $\lVert b\rVert$.
    - `power_steps`: the power-iteration products for `alpha="auto"` (ignored otherwise).

    ```python
    >>> import torch, implicitfn
    >>> M = torch.tensor([[1.0, 0.3], [-0.2, 1.0]])          # not symmetric
    >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(2),
    ...                                       transpose_matvec=lambda u: M.T @ u)
    >>> x, info = implicitfn.FixedPoint(max_steps=200).solve(op, torch.ones(2))
    >>> torch.allclose(M @ x, torch.ones(2), atol=1e-4), bool(info.converged)
    (True, True)
    ```
    """

    max_steps: int = 100
    alpha: StepSize = 1.0
    rtol: float | None = 1e-5
    atol: float = 0.0
    power_steps: int = 10

    def __post_init__(self) -> None:
        check_positive_int(self.max_steps, "max_steps")
        check_step_size(self.alpha, self.power_steps)
        check_tolerance(self.rtol, "rtol", allow_none=True)
        check_tolerance(self.atol, "atol")

    def _solve(self, operator, vector, initial):
        alpha, estimate_products = step_size(self.alpha, operator, self.power_steps)
        if initial is None:
            x, r = tree_zeros_like(vector), vector
        else:
            x, r = initial, tree_sub(vector, operator.mv(initial))
        rhs_norm = tree_norm(vector)
        tol = tolerance(rhs_norm, self.rtol, self.atol)
        start = torch.tensor(estimate_products, dtype=torch.int64, device=rhs_norm.device)
        state = (x, r, tree_norm(r), start)

        def step(state):
            x, r, _, steps = state
            x = tree_axpy(alpha, r, x)
            r = tree_sub(vector, operator.mv(x))
            return x, r, tree_norm(r), steps + 1

        def done(state):
            residual = state[2]
            return (residual <= tol) | ~torch.isfinite(residual)

        x, _, residual, steps = iterate(step, done, state, self.max_steps)
        finite = torch.isfinite(residual)
        if self.rtol is None:
            converged = reduces_residual(residual, rhs_norm)
        else:
            converged = finite & (residual <= tol)
        return x, SolveInfo(residual, rhs_norm, steps, converged, "FixedPoint")
