from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from implicitfn._linear_solve._base import (
    AbstractLinearSolver,
    check_positive_int,
    reduces_residual,
)
from implicitfn._linear_solve._estimates import (
    apply_to_columns,
    check_seed,
    flat_matvec,
    random_matrix,
)
from implicitfn._solution import SolveInfo
from implicitfn._tree import tree_ravel

_SKETCHES = ("gaussian", "columns")


@dataclasses.dataclass(frozen=True)
class Nystrom(AbstractLinearSolver):
    r"""Nyström approximation of the inverse curvature (Hataya & Yamada, AISTATS 2023).

    With a sketch $\Omega \in \mathbb R^{n\times r}$ and $Y = A\Omega$ (the $r$ products are one
    vmapped call), the rank-$r$ Nyström approximation is
    $\hat A = Y (\Omega^\top Y)^{+} Y^\top$; the solver returns
    $x = (\hat A + \rho I)^{-1} b$, inverted through the Woodbury identity: with
    $\hat A = U \Lambda U^\top$ ($U$ orthonormal, $n\times r$),
    $x = U(\Lambda + \rho I)^{-1}U^\top b + \rho^{-1}(b - UU^\top b)$.
    Cost: $r$ products (plus one for the reported residual) and $O(nr^2)$ work; no iteration, so
    no step size to tune, and the same sketch serves a whole vmapped batch of right-hand sides.

    $\hat A$ captures the top of the spectrum; the rest is replaced by $\rho$, so choose $\rho$
    at least about the size of the eigenvalues the sketch misses (and of its error
    $\lVert A - \hat A\rVert$): a $\rho$ far below them inflates those directions by their
    ratio, which shows as a residual above $\lVert b\rVert$, and a $\rho$ far above shrinks the
    whole solution. A sketch of rank $r$ reliably captures somewhat fewer than $r$ top
    eigenvalues: oversample by a few. With $r \ge n$ the sketch is exact and
    $x = (A + \rho I)^{-1} b$. Meant for symmetric positive semidefinite $A$ (a Gauss-Newton
    matrix, or a Hessian near a minimum).

    The parameters are handled as one raveled vector, so all leaves must share a dtype.
    `converged` means: finite, and the exact residual $\lVert b - A x\rVert$ (one extra product)
    is below $\lVert b\rVert$, as for [`Neumann`][implicitfn.Neumann].

    **Arguments:**

    - `rank`: $r$, the number of sketch columns (products); clipped to $n$.
    - `damping`: $\rho > 0$.
    - `sketch`: `"gaussian"` (orthonormalised Gaussian columns: captures the top eigenvectors
      best) or `"columns"` (distinct random columns of the identity, so $Y$ holds $r$ columns of
      $A$, as in Hataya & Yamada).
    - `seed`: the seed of the sketch: the same seed gives the same result, in a loop or a vmap.

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
    >>> bool(info.converged), int(info.num_steps)
    (True, 3)
    ```
    """

    rank: int = 10
    damping: float = 1e-2
    sketch: Literal["gaussian", "columns"] = "gaussian"
    seed: int = 0
    requires_symmetric = True

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

    def _solve(self, operator, vector, initial):
        matvec, template, unravel = flat_matvec(operator)
        size = template.numel()
        rank = min(self.rank, size)
        omega = random_matrix(self.sketch, size, rank, self.seed, template)
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
        basis = q @ vectors

        def inverse(rhs: torch.Tensor) -> torch.Tensor:
            coefficients = basis.T @ rhs
            solution = basis @ (coefficients / (eigenvalues + self.damping))
            if rank == size:  # the complement is empty; rounding must not be divided by rho
                return solution
            return solution + (rhs - basis @ coefficients) / self.damping

        b = tree_ravel(vector)[0]
        if initial is None:
            x, products = inverse(b), rank
        else:
            start = tree_ravel(initial)[0]
            x, products = start + inverse(b - matvec(start)), rank + 1
        residual = torch.linalg.vector_norm(b - matvec(x))
        rhs_norm = torch.linalg.vector_norm(b)
        converged = reduces_residual(residual, rhs_norm)
        steps = torch.tensor(products, device=residual.device)
        return unravel(x), SolveInfo(residual, rhs_norm, steps, converged, "Nystrom")
