from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from implicitfn._linear_solve._base import AbstractLinearSolver, check_tolerances
from implicitfn._solution import Outcome
from implicitfn._tree import tree_ravel


class Factorisation(NamedTuple):
    r"""The state of Dense: $A$ as a matrix and its LU factorisation, for $A$ or $A^\top$."""

    matrix: torch.Tensor
    lu: torch.Tensor
    pivots: torch.Tensor
    singular: torch.Tensor  # LU met an exactly zero pivot
    adjoint: bool  # solve with A^T


@dataclasses.dataclass(frozen=True)
class Dense(AbstractLinearSolver):
    r"""Materialise $A$ as an $n\times n$ matrix (one vmapped product over the basis) and solve exactly.

    `init` costs $n$ operator products, $O(n^2)$ memory and an $O(n^3)$ LU factorisation, done
    once: every right-hand side of a vmapped batch, and the solve with $A^\top$
    (`transpose=True`, `torch.linalg.lu_solve(..., adjoint=True)`), reuse it. For small problems
    and as the reference the other solvers are compared against.

    A direct solve has no budget to spend: when its residual misses the tolerance, $A$ is
    singular to working precision, and the outcome is `Outcome.SINGULAR`. An exactly zero pivot
    returns $x = 0$ (and `SINGULAR`), never NaN.

    **Arguments:**

    - `rtol`, `atol`: the tolerance of the measured residual, $\max(\mathrm{atol},
      \mathrm{rtol}\lVert b\rVert)$; not both 0, which would judge every rounding error a
      failure.

    ```python
    >>> import torch, implicitfn
    >>> M = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(2),
    ...                                       transpose_matvec=lambda u: M.T @ u)
    >>> implicitfn.Dense().solve(op, torch.tensor([3.0, 1.0]))[0]
    tensor([1., 1.])
    >>> solver = implicitfn.Dense()
    >>> state = solver.init(op)                          # 2 products, one LU
    >>> x, residual, event, steps = solver.compute(solver.transpose(state, op),
    ...                                            torch.tensor([2.0, 2.0]), None)
    >>> x                                                 # solves M^T x = b, no new product
    tensor([1., 1.])
    ```
    """

    rtol: float = 1e-5
    atol: float = 0.0

    def __post_init__(self) -> None:
        check_tolerances(self)
        if self.rtol == 0 and self.atol == 0:
            raise ValueError(
                "rtol, atol: Dense needs a tolerance (both are 0); a direct solve has no budget "
                "to run, so rtol=0 would report every rounding error as SINGULAR. Keep the "
                "default rtol=1e-5."
            )

    @property
    def fixed_steps(self) -> bool:
        return True

    def init(self, operator) -> Factorisation:
        matrix = operator.as_matrix()
        lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
        return Factorisation(matrix, lu, pivots, info != 0, adjoint=False)

    def transpose(self, state: Factorisation, operator) -> Factorisation:
        return state._replace(adjoint=not state.adjoint)

    def compute(self, state: Factorisation, vector, initial):
        rhs, unravel = tree_ravel(vector)
        solution = torch.linalg.lu_solve(
            state.lu, state.pivots, rhs[:, None], adjoint=state.adjoint
        )[:, 0]
        solution = torch.where(state.singular, 0.0, solution)
        matrix = state.matrix.mT if state.adjoint else state.matrix
        residual = rhs - matrix @ solution
        steps = torch.tensor(rhs.numel(), dtype=torch.int64, device=rhs.device)
        return unravel(solution), unravel(residual), Outcome.SINGULAR, steps
