from __future__ import annotations

import dataclasses

from implicitfn._linear_solve._base import (
    check_positive_int,
    check_tolerances,
    initial_residual,
    iterate,
    runs_its_budget,
    step_count,
    stopping_rule,
)
from implicitfn._linear_solve._estimates import (
    AbstractStepSizeSolver,
    StepSize,
    check_step_size,
)
from implicitfn._solution import Outcome
from implicitfn._tree import tree_axpy, tree_norm, tree_sub


@dataclasses.dataclass(frozen=True)
class FixedPoint(AbstractStepSizeSolver):
    r"""Damped fixed-point (Richardson) iteration $x \leftarrow x + \alpha\,(b - A x)$.

    Needs no symmetry: it converges when every eigenvalue $\mu$ of $A$ satisfies
    $|1 - \alpha\mu| < 1$. For a fixed-point condition $w = T(w, \lambda)$, where
    $A = I - \partial T/\partial w$, $\alpha = 1$ gives the classical iteration
    $x \leftarrow b + (\partial T/\partial w)^\top x$, which converges whenever $T$ is a
    contraction. Each step's product gives the exact residual $b - Ax$ of the new iterate, so
    the tolerance is checked on the true residual at no extra cost. From $x_0 = 0$ its iterates
    are the partial sums of the [`Neumann`][implicitfn.Neumann] series: the two differ in their
    defaults (a tolerance here, a fixed budget there) and declared capabilities.

    **Arguments:**

    - `max_steps`: the most iterations (one operator product each).
    - `alpha`: the step $\alpha > 0$, or `"auto"`: $\alpha = 1/\hat\mu$ with $\hat\mu$ a
      power-iteration estimate of the largest eigenvalue magnitude of $A$, from `power_steps`
      products counted in `num_steps` (made once in `init`; the solve with $A^\top$ reuses it).
      Safe for symmetric positive definite $A$; for a non-symmetric $A$ it is a heuristic (with
      complex eigenvalues near the imaginary axis no $\alpha$ converges), and a divergence is
      reported as `Outcome.DIVERGED`.
    - `rtol`, `atol`: stop when $\lVert b - Ax\rVert \le \max(\mathrm{atol}, \mathrm{rtol}\lVert b\rVert)$;
      `rtol=0, atol=0` runs exactly `max_steps`.
    - `power_steps`: the power-iteration products for `alpha="auto"` (ignored otherwise).

    ```python
    >>> import torch, implicitfn
    >>> M = torch.tensor([[1.0, 0.3], [-0.2, 1.0]])          # not symmetric
    >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(2),
    ...                                       transpose_matvec=lambda u: M.T @ u)
    >>> x, info = implicitfn.FixedPoint(max_steps=200).solve(op, torch.ones(2))
    >>> torch.allclose(M @ x, torch.ones(2), atol=1e-4), info.outcome_names()
    (True, ['successful'])
    ```
    """

    max_steps: int = 100
    alpha: StepSize = 1.0
    rtol: float = 1e-5
    atol: float = 0.0
    power_steps: int = 10
    fixed_steps = property(runs_its_budget)
    residual_growth_is_divergence = True

    def __post_init__(self) -> None:
        check_positive_int(self.max_steps, "max_steps")
        check_step_size(self.alpha, self.power_steps)
        check_tolerances(self)

    def compute(self, state, vector, initial):
        return richardson(self, state, vector, initial)


def richardson(solver, state, vector, initial):
    r"""`compute` of FixedPoint and Neumann: $x \leftarrow x + \alpha r$, $r = b - A x$.

    `solver` has `max_steps`, `rtol` and `atol`; `state` is `(operator, alpha, products)` from
    `AbstractStepSizeSolver.init`. The residual it returns is exact: no product is added.
    """
    operator, alpha, setup_products = state
    x, r, products = initial_residual(operator, vector, initial)
    steps = step_count(setup_products + products, vector)

    def step(state):
        x, r, steps = state
        x = tree_axpy(alpha, r, x)
        return x, tree_sub(vector, operator.mv(x)), steps + 1

    stop = stopping_rule(solver, vector)
    done = None if stop is None else (lambda state: stop(tree_norm(state[1])))
    x, r, steps = iterate(step, done, (x, r, steps), solver.max_steps)
    return x, r, Outcome.SUCCESSFUL, steps
