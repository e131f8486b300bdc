from __future__ import annotations

import dataclasses

import torch

from implicitfn._linear_solve._base import (
    AbstractLinearSolver,
    check_positive_int,
    check_tolerance,
    iterate,
    tolerance,
)
from implicitfn._solution import SolveInfo
from implicitfn._tree import tree_axpy, tree_norm, tree_sub, tree_vdot, tree_zeros_like


@dataclasses.dataclass(frozen=True)
class CG(AbstractLinearSolver):
    r"""Conjugate gradient for symmetric positive (semi)definite operators.

    Minimises $\tfrac12 x^\top A x - b^\top x$ over growing Krylov subspaces; after $k$ steps the
    error in the $A$-norm shrinks at least like $2\big(\tfrac{\sqrt\kappa-1}{\sqrt\kappa+1}\big)^k$.
    Valid for the Gauss-Newton matrix always, and for the exact Hessian at a strict local
    minimum (the usual assumption of implicit differentiation). When it meets a direction of
    non-positive curvature ($p^\top A p \le 0$) it stops, returns the last good iterate and
    reports `converged=False`: add damping or use [`GaussNewton`][implicitfn.GaussNewton].

    **Arguments:**

    - `max_steps`: the most operator products.
    - `rtol`, `atol`: stop when $\lVert b - Ax\rVert \le \max(\mathrm{atol}, \mathrm{rtol}\lVert b\rVert)$.
      `rtol=None` asks for exactly `max_steps` steps (a deliberately truncated solve); it then
      counts as converged unless it broke down or produced NaN/Inf.

    ```python
    >>> import torch, implicitfn
    >>> M = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(2),
    ...                                       tags={"symmetric", "positive_semidefinite"})
    >>> x, info = implicitfn.CG(max_steps=10).solve(op, torch.tensor([1.0, 2.0]))
    >>> torch.allclose(M @ x, torch.tensor([1.0, 2.0])), bool(info.converged)
    (True, True)
    ```
    """

    max_steps: int = 100
    rtol: float | None = 1e-5
    atol: float = 0.0
    requires_symmetric = True

    def __post_init__(self) -> None:
        check_positive_int(self.max_steps, "max_steps")
        check_tolerance(self.rtol, "rtol", allow_none=True)
        check_tolerance(self.atol, "atol")

    def _solve(self, operator, vector, initial):
        if initial is None:
            x = tree_zeros_like(vector)
            r = vector
        else:
            x = initial
            r = tree_sub(vector, operator.mv(initial))
        rhs_norm = tree_norm(vector)
        tol = tolerance(rhs_norm, self.rtol, self.atol)
        rs = tree_vdot(r, r)
        zero = torch.zeros((), dtype=torch.int64, device=rs.device)
        state = (x, r, r, rs, zero, torch.zeros_like(rs, dtype=torch.bool))

        def step(state):
            x, r, p, rs, steps, broke = state
            ap = operator.mv(p)
            curvature = tree_vdot(p, ap)
            negative = curvature <= 0
            alpha = torch.where(negative, 0.0, rs / torch.where(negative, 1.0, curvature))
            x = tree_axpy(alpha, p, x)
            r = tree_axpy(-alpha, ap, r)
            rs_new = tree_vdot(r, r)
            beta = rs_new / torch.where(rs == 0, 1.0, rs)
            p = tree_axpy(beta, p, r)
            return x, r, p, rs_new, steps + 1, broke | negative

        def done(state):
            rs, broke = state[3], state[5]
            return broke | (torch.sqrt(rs) <= tol) | ~torch.isfinite(rs)

        x, _, _, rs, steps, broke = iterate(step, done, state, self.max_steps)
        residual = torch.sqrt(rs)
        healthy = ~broke & torch.isfinite(residual)
        converged = healthy if self.rtol is None else healthy & (residual <= tol)
        return x, SolveInfo(residual, rhs_norm, steps, converged, "CG")
