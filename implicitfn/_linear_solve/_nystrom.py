from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import torch

from implicitfn._linear_solve._base import (
    AbstractLinearSolver,
    check_positive_int,
    check_tolerances,
    initial_residual,
    step_count,
)
from implicitfn._linear_solve._estimates import (
    apply_to_columns,
    check_seed,
    flat_matvec,
    random_matrix,
)
from implicitfn._operator import AbstractLinearOperator
from implicitfn._solution import Outcome
from implicitfn._tree import tree_add, tree_ravel

_SKETCHES = ("gaussian", "columns")


class Sketch(NamedTuple):
    r"""The state of Nystrom: $\hat A = U \operatorname{diag}(\lambda) U^\top$, raveled."""

    operator: AbstractLinearOperator
    basis: torch.Tensor  # U, (n, r) with orthonormal columns
    eigenvalues: torch.Tensor  # lambda
    complete: bool  # r = n: the sketch is exact


@dataclasses.dataclass(frozen=True)
class Nystrom(AbstractLinearSolver):
    r"""Nyström approximation of the inverse curvature (Hataya & Yamada, AISTATS 2023).

    With a sketch $\Omega \in \mathbb R^{n\times r}$ and $Y = A\Omega$ (the $r$ products are one
    vmapped call), the rank-$r$ Nyström approximation is
    $\hat A = Y (\Omega^\top Y)^{+} Y^\top$; the solver returns
    $x = (\hat A + \rho I)^{-1} b$, inverted through the Woodbury identity: with
    $\hat A = U \Lambda U^\top$ ($U$ orthonormal, $n\times r$),
    $x = U(\Lambda + \rho I)^{-1}U^\top b + \rho^{-1}(b - UU^\top b)$.
    Cost: $r$ products and $O(nr^2)$ work, once, in `init` (the sketch and its
    eigendecomposition); each right-hand side then costs $O(nr)$ and one product for the
    measured residual. No iteration, so no step size to tune, and the same sketch serves a whole
    vmapped batch of right-hand sides and the solve with $A^\top = A$.

    $\hat A$ captures the top of the spectrum; the rest is replaced by $\rho$, so choose $\rho$
    at least about the size of the eigenvalues the sketch misses (and of its error
    $\lVert A - \hat A\rVert$): a $\rho$ far below them inflates those directions by their
    ratio, which shows as a residual above $\lVert b\rVert$ (`Outcome.DIVERGED`), and a $\rho$
    far above shrinks the
    whole solution. A sketch of rank $r$ reliably captures somewhat fewer than $r$ top
    eigenvalues: oversample by a few. With $r \ge n$ the sketch is exact and
    $x = (A + \rho I)^{-1} b$. Meant for symmetric positive semidefinite $A$ (a Gauss-Newton
    matrix, or a Hessian near a minimum).

    The parameters are handled as one raveled vector, so all leaves must share a dtype. The
    rank is its budget: with the default `rtol=0, atol=0` a residual below $\lVert b\rVert$ is
    `MAX_STEPS_REACHED` and not a failure, as for [`Neumann`][implicitfn.Neumann]; with a
    tolerance it is judged as every solver.

    **Arguments:**

    - `rank`: $r$, the number of sketch columns (products); clipped to $n$.
    - `damping`: $\rho > 0$.
    - `sketch`: `"gaussian"` (orthonormalised Gaussian columns: captures the top eigenvectors
      best) or `"columns"` (distinct random columns of the identity, so $Y$ holds $r$ columns of
      $A$, as in Hataya & Yamada).
    - `seed`: the seed of the sketch: the same seed gives the same result, in a loop or a vmap.
    - `rtol`, `atol`: the tolerance the measured residual is judged by (default: none).

    With `initial` $x_0$ it returns $x_0 + (\hat A + \rho I)^{-1}(b - A x_0)$ (one more product).

    ```python
    >>> import torch, implicitfn
    >>> M = torch.diag(torch.tensor([100.0, 10.0, 1.0, 1e-3, 1e-3], dtype=torch.float64))
    >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(5, dtype=M.dtype),
    ...                                       tags={"symmetric", "positive_semidefinite"})
    >>> b = torch.ones(5, dtype=M.dtype)
    >>> x, info = implicitfn.Nystrom(rank=5, damping=1e-3).solve(op, b)
    >>> torch.allclose(x, 1 / (torch.diagonal(M) + 1e-3))      # full rank: exact damped solve
    True
    >>> x, info = implicitfn.Nystrom(rank=3, damping=0.1).solve(op, b)   # top 3 + damping
    >>> info.outcome_names(), bool(info.failed), int(info.num_steps)
    (['max_steps_reached'], False, 3)
    ```
    """

    rank: int = 10
    damping: float = 1e-2
    sketch: Literal["gaussian", "columns"] = "gaussian"
    seed: int = 0
    rtol: float = 0.0
    atol: float = 0.0
    needs_symmetric = True
    needs_positive_definite = True
    residual_growth_is_divergence = True

    def __post_init__(self) -> None:
        check_positive_int(self.rank, "rank")
        if (
            isinstance(self.damping, bool)
            or not isinstance(self.damping, (int, float))
            or not self.damping > 0
        ):
            raise ValueError(
                f"damping: expected a float > 0 (the Woodbury inverse needs rho > 0), got "
                f"{self.damping!r}."
            )
        if self.sketch not in _SKETCHES:
            raise ValueError(f"sketch: expected one of {_SKETCHES}, got {self.sketch!r}.")
        check_seed(self.seed)
        check_tolerances(self)

    @property
    def fixed_steps(self) -> bool:
        return True

    def init(self, operator) -> Sketch:
        r"""The sketch $Y = A\Omega$ and the eigendecomposition of $\hat A$ (`rank` products)."""
        matvec, template, _ = flat_matvec(operator)
        size = template.numel()
        rank = min(self.rank, size)
        omega = random_matrix(self.sketch, size, rank, self.seed, template.dtype, template.device)
        if self.sketch == "gaussian":
            omega = torch.linalg.qr(omega)[0]
        sketched = apply_to_columns(matvec, omega)  # Y = A Omega
        # NaN/Inf products would make the factorisations raise; the residual reports them.
        sketched = torch.where(torch.isfinite(sketched), sketched, 0.0)
        core = omega.T @ sketched
        core = 0.5 * (core + core.T)
        # A_hat = Y core^+ Y^T = Q (R core^+ R^T) Q^T = (Q V) diag(lam) (Q V)^T.
        q, r = torch.linalg.qr(sketched)
        small = r @ torch.linalg.pinv(core, hermitian=True) @ r.T
        eigenvalues, vectors = torch.linalg.eigh(0.5 * (small + small.T))
        return Sketch(operator, q @ vectors, eigenvalues, complete=rank == size)

    def compute(self, state: Sketch, vector, initial):
        x, r, products = initial_residual(state.operator, vector, initial)
        rhs, unravel = tree_ravel(r)
        coefficients = state.basis.T @ rhs
        correction = state.basis @ (coefficients / (state.eigenvalues + self.damping))
        if not state.complete:  # else the complement is empty: rounding must not be divided by rho
            correction = correction + (rhs - state.basis @ coefficients) / self.damping
        steps = step_count(state.basis.shape[1] + products, vector)
        return tree_add(x, unravel(correction)), None, Outcome.SUCCESSFUL, steps
