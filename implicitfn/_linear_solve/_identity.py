from __future__ import annotations

import dataclasses

import torch

from implicitfn._linear_solve._base import AbstractLinearSolver
from implicitfn._solution import SolveInfo
from implicitfn._tree import tree_map, tree_norm, tree_sub


@dataclasses.dataclass(frozen=True)
class Identity(AbstractLinearSolver):
    r"""The one-step approximation $A^{-1} \approx I$, i.e. $x = b$.

    The cheapest hypergradient: it keeps only the direct effect of one step of the inner
    optimiser (Luketina et al. 2016; the baseline of Lorraine et al. 2020). The residual
    $\lVert b - A b\rVert$ is computed (one product) so its quality shows in
    [`SolveInfo`][implicitfn.SolveInfo]; it counts as converged whenever it is finite.

    ```python
    >>> import torch, implicitfn
    >>> op = implicitfn.FunctionLinearOperator(lambda v: 2 * v, torch.zeros(2), tags={"symmetric"})
    >>> x, info = implicitfn.Identity().solve(op, torch.ones(2))
    >>> x, float(info.residual_norm)
    (tensor([1., 1.]), 1.4142135381698608)
    ```
    """

    def _solve(self, operator, vector, initial):
        x = tree_map(torch.clone, vector)
        residual = tree_norm(tree_sub(vector, operator.mv(x)))
        steps = torch.zeros((), dtype=torch.int64, device=residual.device)
        info = SolveInfo(residual, tree_norm(vector), steps, torch.isfinite(residual), "Identity")
        return x, info
