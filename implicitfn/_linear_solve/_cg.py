from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from implicitfn._linear_solve._base import (
    AbstractLinearSolver,
    check_positive_int,
    check_tolerance,
    check_vector,
    iterate,
    safe_divisor,
    tolerance,
)
from implicitfn._linear_solve._estimates import check_seed, hutchinson_diagonal
from implicitfn._operator import AbstractLinearOperator
from implicitfn._solution import SolveInfo, under_transform
from implicitfn._tree import (
    Tree,
    tree_axpy,
    tree_map,
    tree_norm,
    tree_ravel,
    tree_sub,
    tree_vdot,
    tree_zeros_like,
)


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

    - `max_steps`: the most iterations (one operator product each).
    - `rtol`, `atol`: stop when $\lVert b - Ax\rVert \le \max(\mathrm{atol}, \mathrm{rtol}\lVert b\rVert)$.
      `rtol=None` asks for exactly `max_steps` steps (a deliberately truncated solve); it then
      counts as converged unless it broke down or produced NaN/Inf.
    - `preconditioner`: `None`; `"jacobi"`, which divides by an estimate of $\mathrm{diag}(A)$
      (Hutchinson: $\frac1k\sum_i z_i \odot A z_i$ over $k$ = `probes` random $\pm1$ vectors,
      one vmapped call; exact for a diagonal $A$; entries are taken in absolute value and floored
      at $10^{-6}$ of the largest); or a callable `r -> M^{-1} r` on trees, which must be a
      symmetric positive definite linear map. Preconditioned CG converges like CG on
      $M^{-1/2} A M^{-1/2}$: a badly scaled problem takes far fewer steps.
    - `probes`, `seed`: the number of products and the seed of the `"jacobi"` estimate (same
      seed, same estimate: solves are reproducible and a vmapped batch equals a loop).

    `num_steps` counts every operator product, the `probes` of `"jacobi"` included.

    ```python
    >>> import torch, implicitfn
    >>> M = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(2),
    ...                                       tags={"symmetric", "positive_semidefinite"})
    >>> x, info = implicitfn.CG(max_steps=10).solve(op, torch.tensor([1.0, 2.0]))
    >>> torch.allclose(M @ x, torch.tensor([1.0, 2.0])), bool(info.converged)
    (True, True)
    >>> D = torch.diag(torch.logspace(0, 4, 50))          # badly scaled
    >>> op = implicitfn.FunctionLinearOperator(lambda v: D @ v, torch.zeros(50),
    ...                                       tags={"symmetric", "positive_semidefinite"})
    >>> _, plain = implicitfn.CG(max_steps=200).solve(op, torch.ones(50))
    >>> _, jacobi = implicitfn.CG(preconditioner="jacobi", probes=1).solve(op, torch.ones(50))
    >>> int(plain.num_steps) > 20, int(jacobi.num_steps)   # 1 probe + 1 iteration
    (True, 2)
    ```
    """

    max_steps: int = 100
    rtol: float | None = 1e-5
    atol: float = 0.0
    preconditioner: str | Callable[[Tree], Tree] | None = None
    probes: int = 10
    seed: int = 0
    requires_symmetric = True

    def __post_init__(self) -> None:
        check_positive_int(self.max_steps, "max_steps")
        check_tolerance(self.rtol, "rtol", allow_none=True)
        check_tolerance(self.atol, "atol")
        if isinstance(self.preconditioner, str):
            if self.preconditioner != "jacobi":
                raise ValueError(
                    f"preconditioner: unknown name {self.preconditioner!r}; use 'jacobi', a "
                    "callable r -> M^{-1} r, or None."
                )
        elif self.preconditioner is not None and not callable(self.preconditioner):
            raise TypeError(
                "preconditioner: expected None, 'jacobi' or a callable r -> M^{-1} r, got "
                f"{type(self.preconditioner).__name__}."
            )
        check_positive_int(self.probes, "probes")
        check_seed(self.seed)

    def _preconditioner(
        self, operator: AbstractLinearOperator
    ) -> tuple[Callable[[Tree], Tree], int]:
        """`(r -> M^{-1} r, operator products spent building it)`."""
        if self.preconditioner is None:
            return (lambda r: r), 0
        if callable(self.preconditioner):
            return self.preconditioner, 0
        diagonal = hutchinson_diagonal(operator, self.probes, self.seed).abs()
        diagonal = torch.clamp(diagonal, min=1e-6 * diagonal.max()).detach()
        inverse = tree_ravel(operator.template)[1](1.0 / diagonal)
        return (lambda r: tree_map(torch.mul, inverse, r)), self.probes

    def _solve(self, operator, vector, initial):
        precondition, setup_products = self._preconditioner(operator)
        if _plain_vector(vector, initial):
            solved = self._solve_plain(operator, vector, initial, precondition, setup_products)
            if solved is not None:
                return solved
        if initial is None:
            x = tree_zeros_like(vector)
            r = vector
        else:
            x = initial
            r = tree_sub(vector, operator.mv(initial))
        rhs_norm = tree_norm(vector)
        tol = tolerance(rhs_norm, self.rtol, self.atol)
        z = precondition(r)
        if callable(self.preconditioner):
            check_vector(z, operator.template, "preconditioner(r)")
        rz = tree_vdot(r, z)
        rs = rz if z is r else tree_vdot(r, r)  # unpreconditioned: the same number
        start = torch.tensor(setup_products, dtype=torch.int64, device=rs.device)
        state = (x, r, z, rz, rs, start, torch.zeros_like(rs, dtype=torch.bool))

        def step(state):
            x, r, p, rz, _, steps, broke = state
            ap = operator.mv(p)
            curvature = tree_vdot(p, ap)
            negative = curvature <= 0
            alpha = torch.where(negative, 0.0, rz / torch.where(negative, 1.0, curvature))
            x = tree_axpy(alpha, p, x)
            r = tree_axpy(-alpha, ap, r)
            z = precondition(r)
            rz_new = tree_vdot(r, z)
            rs_new = rz_new if z is r else tree_vdot(r, r)
            beta = rz_new / safe_divisor(rz)
            p = tree_axpy(beta, p, z)
            # r^T M^{-1} r < 0 means the preconditioner is not positive definite.
            return x, r, p, rz_new, rs_new, steps + 1, broke | negative | (rz_new < 0)

        def done(state):
            rs, broke = state[4], state[6]
            return broke | (torch.sqrt(rs) <= tol) | ~torch.isfinite(rs)

        x, _, _, _, rs, steps, broke = iterate(step, done, state, self.max_steps)
        residual = torch.sqrt(rs)
        healthy = ~broke & torch.isfinite(residual)
        converged = healthy if self.rtol is None else healthy & (residual <= tol)
        return x, SolveInfo(residual, rhs_norm, steps, converged, "CG")

    def _solve_plain(self, operator, b, initial, precondition, setup_products):
        """The same iteration on one plain vector, with Python-number scalars and in-place updates.

        The step above is written for `torch.func` transforms (no Python branch on a tensor, a
        new tree per operation): about 20 small kernels besides the product, 0.15 ms per step
        measured, 40% of a logistic-regression product. Here a step is the product, two dot
        products read as numbers and three in-place updates of the solver's own buffers. Same
        arithmetic, same stopping rule, same report; None (and the generic path) when a product
        turns out to carry an autograd graph, which in-place updates would break.
        """
        if initial is None:
            x = torch.zeros_like(b)
            r = b.clone()
        else:
            x = initial.clone()
            r = b - operator.mv(initial)
            if r.requires_grad:
                return None
        rhs_norm = torch.linalg.vector_norm(b)
        tol = float(tolerance(rhs_norm, self.rtol, self.atol))
        z = precondition(r)
        if callable(self.preconditioner):
            check_vector(z, operator.template, "preconditioner(r)")
        rz = _dot(r, z)
        rs = rz if z is r else _dot(r, r)
        p = z.clone()  # updated in place: never a tensor the preconditioner may keep
        steps, broke = setup_products, False
        for _ in range(self.max_steps):
            if broke or not math.isfinite(rs) or math.sqrt(rs) <= tol:
                break
            ap = operator.mv(p)
            if ap.requires_grad:
                return None
            curvature = _dot(p, ap)
            steps += 1
            if curvature <= 0:  # x and r unchanged; the step counts, as above
                broke = True
                break
            alpha = rz / curvature
            x.add_(p, alpha=alpha)
            r.add_(ap, alpha=-alpha)
            z = precondition(r)
            rz_new = _dot(r, z)
            rs = rz_new if z is r else _dot(r, r)
            broke = rz_new < 0  # the preconditioner is not positive definite
            p.mul_(rz_new / (rz if rz != 0 else 1.0)).add_(z)
            rz = rz_new
        device = b.device
        residual = torch.tensor(
            math.sqrt(rs) if rs >= 0 else math.nan, dtype=b.dtype, device=device
        )
        healthy = not broke and math.isfinite(float(residual))
        converged = healthy if self.rtol is None else healthy and float(residual) <= tol
        return x, SolveInfo(
            residual,
            rhs_norm,
            torch.tensor(steps, dtype=torch.int64, device=device),
            torch.tensor(converged, device=device),
            "CG",
        )


def _plain_vector(vector: Tree, initial: Tree | None) -> bool:
    """One real floating tensor, no autograd graph, no transform: the case `_solve_plain` serves."""
    tensors = [vector] if initial is None else [vector, initial]
    return (
        not under_transform()
        and not torch.compiler.is_compiling()
        and all(
            type(t) is torch.Tensor and t.is_floating_point() and not t.requires_grad
            for t in tensors
        )
    )


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))
