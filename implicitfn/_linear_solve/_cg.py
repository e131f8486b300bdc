from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree

from implicitfn._linear_solve._base import (
    AbstractLinearSolver,
    check_positive_int,
    check_tolerances,
    check_vector,
    initial_residual,
    iterate,
    runs_its_budget,
    step_count,
    stopping_rule,
)
from implicitfn._linear_solve._estimates import check_seed, hutchinson_diagonal
from implicitfn._operator import AbstractLinearOperator
from implicitfn._solution import Outcome
from implicitfn._tree import Tree, tree_axpy, tree_map, tree_ravel, tree_vdot


@dataclasses.dataclass(frozen=True)
class CG(AbstractLinearSolver):
    r"""Conjugate gradient for symmetric positive definite operators.

    Minimises $\tfrac12 x^\top A x - b^\top x$ over growing Krylov subspaces; after $k$ steps the
    error in the $A$-norm shrinks at least like $2\big(\tfrac{\sqrt\kappa-1}{\sqrt\kappa+1}\big)^k$.
    Valid for the Gauss-Newton matrix always, and for the exact Hessian at a strict local
    minimum (the usual assumption of implicit differentiation). When it meets a direction of
    non-positive curvature ($p^\top A p \le 0$) it stops, returns the last good iterate and
    reports `Outcome.NEGATIVE_CURVATURE`: add damping, use
    [`GaussNewton`][implicitfn.GaussNewton], or [`MINRES`][implicitfn.MINRES]. CG reduces the
    $A$-norm error at every step, not the residual: a truncated solve on an ill-conditioned $A$
    can leave a residual above $\lVert b\rVert$ while its error shrank, so that is
    `MAX_STEPS_REACHED`, not a divergence.

    **Arguments:**

    - `max_steps`: the most iterations (one operator product each).
    - `rtol`, `atol`: stop when the recursive residual meets
      $\max(\mathrm{atol}, \mathrm{rtol}\lVert b\rVert)$; the solve is then judged by the
      measured residual (one more product). `rtol=0, atol=0` runs exactly `max_steps` (a
      deliberately truncated solve, with no value read between steps).
    - `preconditioner`: `None`; `"jacobi"`, which divides by an estimate of $\mathrm{diag}(A)$
      (Hutchinson: $\frac1k\sum_i z_i \odot A z_i$ over $k$ = `probes` random $\pm1$ vectors,
      one vmapped call made once in `init`; exact for a diagonal $A$; entries are taken in
      absolute value and floored at $10^{-6}$ of the largest); or a callable `r -> M^{-1} r` on
      trees, which must be a symmetric positive definite linear map (one that is not is reported
      as `Outcome.BREAKDOWN`). Preconditioned CG converges like CG on $M^{-1/2} A M^{-1/2}$: a
      badly scaled problem takes far fewer steps.
    - `probes`, `seed`: the number of products and the seed of the `"jacobi"` estimate (same
      seed, same estimate: solves are reproducible and a vmapped batch equals a loop).

    `num_steps` counts every operator product, the `probes` of `"jacobi"` included.

    ```python
    >>> import torch, implicitfn
    >>> M = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(2),
    ...                                       tags={"symmetric", "positive_semidefinite"})
    >>> x, info = implicitfn.CG(max_steps=10).solve(op, torch.tensor([1.0, 2.0]))
    >>> torch.allclose(M @ x, torch.tensor([1.0, 2.0])), bool(info.successful)
    (True, True)
    >>> _, short = implicitfn.CG(max_steps=1, rtol=0).solve(op, torch.tensor([1.0, 2.0]))
    >>> short.outcome_names(), bool(short.failed)      # a fixed budget, as asked
    (['max_steps_reached'], False)
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
    rtol: float = 1e-5
    atol: float = 0.0
    preconditioner: str | Callable[[Tree], Tree] | None = None
    probes: int = 10
    seed: int = 0
    needs_symmetric = True
    needs_positive_definite = True
    accepts_preconditioner = True
    fixed_steps = property(runs_its_budget)

    def __post_init__(self) -> None:
        check_positive_int(self.max_steps, "max_steps")
        check_tolerances(self)
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

    def init(
        self, operator: AbstractLinearOperator
    ) -> tuple[AbstractLinearOperator, Callable[[Tree], Tree] | None, int]:
        """`(operator, r -> M^{-1} r or None, products spent building it)`."""
        if self.preconditioner is None or callable(self.preconditioner):
            return operator, self.preconditioner, 0
        diagonal = hutchinson_diagonal(operator, self.probes, self.seed).abs()
        diagonal = torch.clamp(diagonal, min=1e-6 * diagonal.max()).detach()
        inverse = tree_ravel(operator.template)[1](1.0 / diagonal)
        return operator, lambda r: tree_map(torch.mul, inverse, r), self.probes

    def compute(self, state, vector, initial):
        operator, precondition, setup_products = state
        x, r, products = initial_residual(operator, vector, initial)
        z = r if precondition is None else precondition(r)
        if callable(self.preconditioner):
            check_vector(z, operator.template, "preconditioner(r)")
            # Same keys and shapes is not enough for torch.func, which compares whole pytree
            # specs: a TensorDict built anew may lack r's device, for instance.
            if pytree.tree_structure(z) != pytree.tree_structure(r):
                raise ValueError(
                    "preconditioner(r): returned the right keys and shapes, but not in a tree "
                    "built like r (another container type, or a TensorDict with another "
                    "device, batch size or names); build the result from r, e.g. "
                    "r.apply(...), or as TensorDict(..., batch_size=r.batch_size, "
                    "device=r.device)."
                )
        rz = tree_vdot(r, z)
        # Flags, cheaper in the step than an outcome code: the curvature stayed positive, and
        # r^T M^{-1} r stayed >= 0 (else the preconditioner is not positive definite).
        healthy = torch.ones_like(rz, dtype=torch.bool)
        steps = step_count(setup_products + products, vector)
        rs = rz if precondition is None else tree_vdot(r, r)
        start = (x, r, z, rz, rs, steps, healthy, healthy)
        # A residual at rounding level is solved: there the products' rounding can make
        # p^T A p <= 0 on a positive definite A, which is no evidence of negative curvature.
        rounding = (10 * torch.finfo(rs.dtype).eps) ** 2 * tree_vdot(vector, vector)

        # One step: the product, two dot products, three axpys and a dozen scalar kernels (no
        # value is read, so it runs under vmap and compiles).
        def step(state):
            x, r, p, rz, rs, steps, positive, definite = state
            ap = operator.mv(p)
            curvature = tree_vdot(p, ap)
            bent, solved = curvature > 0, rz == 0  # solved: r = 0, then p = 0 (no curvature)
            converged = solved | (rs <= rounding)
            # Once a flag is down nothing moves: the last good iterate is returned.
            moving = bent & positive if precondition is None else bent & positive & definite
            # Divisors that are never 0, so that no NaN reaches a derivative through the solve.
            alpha = torch.where(moving, rz / torch.where(moving, curvature, 1.0), 0.0)
            x = tree_axpy(alpha, p, x)
            r = tree_axpy(-alpha, ap, r)
            if precondition is None:
                z = r
                rz_new = rs = tree_vdot(r, r)
            else:
                z = precondition(r)
                rz_new, rs = tree_vdot(r, z), tree_vdot(r, r)
                definite = definite & (rz_new >= 0)
            p = tree_axpy(rz_new / torch.where(solved, 1.0, rz), p, z)
            positive = positive & (bent | converged)
            return x, r, p, rz_new, rs, steps + 1, positive, definite

        stop = stopping_rule(self, vector)
        done = None if stop is None else (lambda s: stop(torch.sqrt(s[4])) | ~(s[6] & s[7]))
        x, *_, steps, positive, definite = iterate(step, done, start, self.max_steps)
        # A breakdown first: after it p is no longer a conjugate direction, so a later
        # non-positive curvature means nothing.
        event = torch.where(
            definite,
            torch.where(positive, Outcome.SUCCESSFUL, Outcome.NEGATIVE_CURVATURE),
            Outcome.BREAKDOWN,
        )
        return x, None, event, steps
