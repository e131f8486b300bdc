from __future__ import annotations

import dataclasses

import torch

from implicitfn._linear_solve._base import AbstractLinearSolver, check_tolerance
from implicitfn._solution import SolveInfo
from implicitfn._tree import tree_ravel


@dataclasses.dataclass(frozen=True)
class Dense(AbstractLinearSolver):
    r"""Materialise $A$ as an $n\times n$ matrix (one vmapped product over the basis) and solve exactly.

    Costs $n$ operator products, $O(n^2)$ memory and an $O(n^3)$ LU factorisation: for small
    problems and as the reference the other solvers are compared against. A singular matrix is
    reported as `converged=False`.

    **Arguments:**

    - `rtol`: the relative residual under which the solve counts as converged; `None` uses
      $\sqrt{\varepsilon}$ of the dtype.

    ```python
    >>> import torch, implicitfn
    >>> M = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(2),
    ...                                       transpose_matvec=lambda u: M.T @ u)
    >>> implicitfn.Dense().solve(op, torch.tensor([3.0, 1.0]))[0]
    tensor([1., 1.])
    ```
    """

    rtol: float | None = None

    def __post_init__(self) -> None:
        check_tolerance(self.rtol, "rtol", allow_none=True)

    def _solve(self, operator, vector, initial):
        matrix = operator.as_matrix()
        rhs, unravel = tree_ravel(vector)
        solution, status = torch.linalg.solve_ex(matrix, rhs)
        residual = torch.linalg.vector_norm(matrix @ solution - rhs)
        rhs_norm = torch.linalg.vector_norm(rhs)
        rtol = torch.finfo(rhs.dtype).eps ** 0.5 if self.rtol is None else self.rtol
        converged = (status == 0) & torch.isfinite(residual) & (residual <= rtol * rhs_norm)
        steps = torch.tensor(rhs.numel(), device=rhs.device)
        return unravel(solution), SolveInfo(residual, rhs_norm, steps, converged, "Dense")
