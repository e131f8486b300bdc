from __future__ import annotations

import dataclasses

import torch

from implicitfn._linear_solve._base import (
    AbstractLinearSolver,
    check_positive_int,
    check_tolerances,
    initial_residual,
    iterate,
    runs_its_budget,
    safe_divisor,
    step_count,
    stopping_rule,
)
from implicitfn._solution import Outcome
from implicitfn._tree import tree_axpy, tree_norm, tree_scale, tree_vdot, tree_zeros_like


@dataclasses.dataclass(frozen=True)
class MINRES(AbstractLinearSolver):
    r"""MINRES (Paige & Saunders, 1975) for symmetric operators, definite or not.

    Minimises $\lVert b - A x\rVert_2$ over the Krylov subspace
    $x_0 + \mathrm{span}\{r_0, A r_0, \ldots, A^{k-1} r_0\}$ with the Lanczos three-term
    recurrence, so each step costs one product and the memory is a few vectors, as in
    [`CG`][implicitfn.CG]. Unlike CG it needs no definiteness: it is the Krylov method for the
    exact Hessian of a non-convex loss (a saddle or an inexact minimum), where CG meets negative
    curvature and stops. The residual norm never increases from one step to the next. On a
    singular, inconsistent system it returns the least-squares direction it reached and reports
    `Outcome.SINGULAR` (the recurrence met a zero pivot with a residual left).

    **Arguments:**

    - `max_steps`: the most iterations (one operator product each).
    - `rtol`, `atol`: stop when the recursive residual of the method meets
      $\max(\mathrm{atol}, \mathrm{rtol}\lVert b\rVert)$; the solve is then judged by the
      measured residual (one more product). `rtol=0, atol=0` runs exactly `max_steps`.

    ```python
    >>> import torch, implicitfn
    >>> M = torch.diag(torch.tensor([2.0, -1.0, 3.0]))        # symmetric, indefinite
    >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(3), tags={"symmetric"})
    >>> implicitfn.CG().solve(op, torch.ones(3))[1].outcome_names()
    ['negative_curvature']
    >>> x, info = implicitfn.MINRES().solve(op, torch.ones(3))
    >>> x, info.outcome_names(), int(info.num_steps)
    (tensor([ 0.5000, -1.0000,  0.3333]), ['successful'], 3)
    ```
    """

    max_steps: int = 100
    rtol: float = 1e-5
    atol: float = 0.0
    needs_symmetric = True
    fixed_steps = property(runs_its_budget)

    def __post_init__(self) -> None:
        check_positive_int(self.max_steps, "max_steps")
        check_tolerances(self)

    def compute(self, state, vector, initial):
        operator = state
        x, r, products = initial_residual(operator, vector, initial)
        beta_1 = tree_norm(r)
        one, zero = torch.ones_like(beta_1), torch.zeros_like(beta_1)
        zeros = tree_zeros_like(vector)
        # Lanczos: (previous vector, current vector, off-diagonal beta_k coupling them; 0 at
        # the start). QR of the tridiagonal matrix: the last two Givens rotations (c, s) and the
        # last two update directions w. eta: the rotated right-hand side, |eta| the residual.
        start = (
            x,
            zeros,
            tree_scale(1.0 / safe_divisor(beta_1), r),
            zero,
            zeros,
            zeros,
            (one, zero),
            (one, zero),
            beta_1,
            step_count(products, vector),
            torch.zeros_like(beta_1, dtype=torch.bool),
        )

        def step(state):
            x, v_prev, v, beta, w_prev, w_prev2, rot_prev, rot_prev2, eta, steps, singular = state
            av = operator.mv(v)
            alpha = tree_vdot(v, av)
            p = tree_axpy(-beta, v_prev, tree_axpy(-alpha, v, av))
            beta_next = tree_norm(p)
            v_next = tree_scale(1.0 / safe_divisor(beta_next), p)  # zero after a happy breakdown
            # Apply the two previous rotations to the new column (beta, alpha, beta_next).
            (c_prev, s_prev), (c_prev2, s_prev2) = rot_prev, rot_prev2
            epsilon = s_prev2 * beta
            delta_bar = c_prev2 * beta
            delta = c_prev * delta_bar + s_prev * alpha
            gamma_bar = -s_prev * delta_bar + c_prev * alpha
            # A new rotation annihilates beta_next.
            gamma = torch.hypot(gamma_bar, beta_next)
            pivotless = gamma == 0
            c = torch.where(pivotless, one, gamma_bar / safe_divisor(gamma))
            s = torch.where(pivotless, zero, beta_next / safe_divisor(gamma))
            direction = tree_axpy(-delta, w_prev, tree_axpy(-epsilon, w_prev2, v))
            w = tree_scale(1.0 / safe_divisor(gamma), direction)
            x = tree_axpy(torch.where(pivotless, zero, c * eta), w, x)
            # A zero pivot once the residual is 0 (a fixed budget running on) is no singularity.
            singular = singular | (pivotless & (eta != 0))
            return (
                x,
                v,
                v_next,
                beta_next,
                w,
                w_prev,
                (c, s),
                rot_prev,
                -s * eta,
                steps + 1,
                singular,
            )

        stop = stopping_rule(self, vector)
        done = None if stop is None else (lambda state: stop(state[8].abs()) | state[10])
        x, *_, steps, singular = iterate(step, done, start, self.max_steps)
        return x, None, torch.where(singular, Outcome.SINGULAR, Outcome.SUCCESSFUL), steps
