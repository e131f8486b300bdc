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
from implicitfn._linear_solve._estimates import flat_matvec
from implicitfn._solution import Outcome
from implicitfn._tree import tree_ravel


@dataclasses.dataclass(frozen=True)
class GMRES(AbstractLinearSolver):
    r"""Restarted GMRES (Saad & Schultz, 1986) for general, non-symmetric operators.

    Each cycle builds an orthonormal basis of the Krylov subspace
    $\mathrm{span}\{r_0, A r_0, \ldots, A^{m-1} r_0\}$ (Arnoldi, Gram-Schmidt applied twice)
    and picks the point of $x_0$ plus that subspace with the smallest residual
    $\lVert b - A x\rVert_2$; after $m$ = `restart` products it moves to that point and starts
    a new cycle. Only products with $A$ are needed, never $A^\top$, and the residual never grows.
    It is the method for the non-symmetric Jacobian of a
    [`fixed_point`][implicitfn.fixed_point] or [`root`][implicitfn.root] condition when
    [`FixedPoint`][implicitfn.FixedPoint] is slow or diverges (it converges for every
    invertible $A$ when `restart` is at least the dimension, and for the usual $I - J$ with
    $J$ a contraction long before). It stores `restart + 1` vectors, and on strongly
    non-normal or indefinite problems a short restart can stall: a cycle that leaves the
    residual where it was would repeat itself, so it stops there and reports
    `Outcome.BREAKDOWN` (as it does for a singular Hessenberg matrix).

    The parameters are handled as one raveled vector, so all leaves must share a dtype.

    **Arguments:**

    - `max_steps`: the most operator products in all cycles together.
    - `restart`: $m$, the products per cycle (the size of the basis).
    - `rtol`, `atol`: stop when the recursive residual of the method meets
      $\max(\mathrm{atol}, \mathrm{rtol}\lVert b\rVert)$; the solve is then judged by the
      measured residual (one more product). `rtol=0, atol=0` runs exactly `max_steps`.

    ```python
    >>> import torch, implicitfn
    >>> M = torch.tensor([[1.0, 2.0, 0.0], [-2.0, 1.0, 1.0], [0.0, 0.0, 3.0]])  # not symmetric
    >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(3),
    ...                                       transpose_matvec=lambda u: M.T @ u)
    >>> implicitfn.FixedPoint().solve(op, torch.ones(3))[1].outcome_names()
    ['diverged']
    >>> x, info = implicitfn.GMRES().solve(op, torch.ones(3))
    >>> torch.allclose(M @ x, torch.ones(3), atol=1e-5), info.outcome_names(), int(info.num_steps)
    (True, ['successful'], 3)
    ```
    """

    max_steps: int = 100
    restart: int = 20
    rtol: float = 1e-5
    atol: float = 0.0
    fixed_steps = property(runs_its_budget)

    def __post_init__(self) -> None:
        check_positive_int(self.max_steps, "max_steps")
        check_positive_int(self.restart, "restart")
        check_tolerances(self)

    def compute(self, state, vector, initial):
        operator = state
        matvec, _, unravel = flat_matvec(operator)
        x, r, products = initial_residual(operator, vector, initial)
        x, r, b = (tree_ravel(tree)[0] for tree in (x, r, vector))
        m = self.restart
        # A cycle that reduces the residual by less than rounding would only repeat itself.
        no_progress = 1 - 100 * torch.finfo(b.dtype).eps
        rows = torch.arange(m + 1, device=b.device)

        def unit(index: torch.Tensor) -> torch.Tensor:
            """The basis vector e_index of length m + 1 (a mask, vmap-safe for a tensor index)."""
            return (rows == index).to(b.dtype)

        def start_cycle(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
            beta = torch.linalg.vector_norm(r)
            basis = torch.cat([(r / safe_divisor(beta))[None], r.new_zeros(m, r.numel())])
            hessenberg = r.new_zeros(m + 1, m)  # as built by Arnoldi, for the restart residual
            triangular = r.new_zeros(m + 1, m)  # after the Givens rotations
            rotations = r.new_zeros(2, m)
            g = beta * unit(torch.zeros((), dtype=torch.int64, device=b.device))
            j = torch.zeros((), dtype=torch.int64, device=b.device)
            return x, basis, hessenberg, triangular, rotations, g, j, beta

        def cycle_solution(cycle: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
            """The minimiser over the current basis, and the coefficients that give it."""
            x, basis, _, triangular, _, g, j, _ = cycle
            filled = rows[:m] < j
            square = triangular[:m]
            diagonal = torch.diagonal(square)
            square = square + torch.diag(torch.where(diagonal == 0, 1.0, 0.0).to(b.dtype))
            rhs = torch.where(filled, g[:m], 0.0)
            y = torch.linalg.solve_triangular(square, rhs[:, None], upper=True)[:, 0]
            return x + y @ basis[:m], y

        def step(state):
            *cycle, steps, broke = state
            x, basis, hessenberg, triangular, rotations, g, j, beta = cycle
            e_j, e_next = unit(j), unit(j + 1)
            w = matvec(e_j @ basis)
            h = basis @ w
            w = w - h @ basis
            correction = basis @ w  # Gram-Schmidt twice keeps the basis orthonormal
            w = w - correction @ basis
            h = h + correction
            h_next = torch.linalg.vector_norm(w)
            h = h + e_next * h_next
            basis = basis + e_next[:, None] * (w / safe_divisor(h_next))[None]
            hessenberg = hessenberg + h[:, None] * e_j[None, :m]
            # Apply the previous rotations (i < j) to the new column, then a new one at j.
            column = list(h.unbind())
            for i in range(m):
                c, s = rotations[0, i], rotations[1, i]
                upper, lower = column[i], column[i + 1]
                active = i < j
                column[i] = torch.where(active, c * upper + s * lower, upper)
                column[i + 1] = torch.where(active, -s * upper + c * lower, lower)
            column = torch.stack(column)
            top, bottom = e_j @ column, e_next @ column
            radius = torch.hypot(top, bottom)
            c = torch.where(radius == 0, 1.0, top / safe_divisor(radius))
            s = torch.where(radius == 0, 0.0, bottom / safe_divisor(radius))
            column = column + e_j * (radius - top) - e_next * bottom
            triangular = triangular + column[:, None] * e_j[None, :m]
            at_j = e_j[:m].bool()
            rotations = torch.stack(
                [torch.where(at_j, c, rotations[0]), torch.where(at_j, s, rotations[1])]
            )
            g_j = e_j @ g
            left = g_j != 0  # a residual to reduce: else a zero column is no breakdown
            g = g + e_j * (c * g_j - g_j) - e_next * (s * g_j)
            cycle = (x, basis, hessenberg, triangular, rotations, g, j + 1, beta)
            # At the end of a cycle: move to its minimiser and restart from the residual there,
            # b - A x_new = V (beta e_1 - H y) by the Arnoldi relation (no extra product).
            x_new, y = cycle_solution(cycle)
            residual = (beta * unit(torch.zeros_like(j)) - hessenberg @ y) @ basis
            restarted = start_cycle(x_new, residual)
            cycle_ends = j + 1 == m
            cycle = tuple(
                torch.where(cycle_ends, fresh, going)
                for fresh, going in zip(restarted, cycle, strict=True)
            )
            stalled = cycle_ends & (restarted[-1] >= no_progress * beta)
            return (*cycle, steps + 1, broke | (left & ((radius == 0) | stalled)))

        stop = stopping_rule(self, vector)

        def done(state):
            g, j = state[5], state[6]
            return state[-1] | stop((unit(j) @ g).abs())

        state = (
            *start_cycle(x, r),
            step_count(products, vector),
            torch.zeros((), dtype=torch.bool, device=b.device),
        )
        state = iterate(step, None if stop is None else done, state, self.max_steps)
        x, _ = cycle_solution(state[:-2])
        steps, broke = state[-2:]
        return unravel(x), None, torch.where(broke, Outcome.BREAKDOWN, Outcome.SUCCESSFUL), steps
