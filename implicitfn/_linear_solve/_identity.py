from __future__ import annotations

import dataclasses

import torch

from implicitfn._linear_solve._base import AbstractLinearSolver, check_tolerances, step_count
from implicitfn._solution import Outcome
from implicitfn._tree import tree_map


@dataclasses.dataclass(frozen=True)
class Identity(AbstractLinearSolver):
    r"""The one-step approximation $A^{-1} \approx I$, i.e. $x = b$.

    The cheapest hypergradient: it keeps only the direct effect of one step of the inner
    optimiser (Luketina et al. 2016; the baseline of Lorraine et al. 2020). Its residual
    $\lVert b - A b\rVert$ is measured (one product, not counted in `num_steps`) so its quality
    shows in [`SolveInfo`][implicitfn.SolveInfo]: with the default `rtol=0, atol=0` it asks for
    no tolerance, and its outcome is `MAX_STEPS_REACHED` (its budget is no product at all),
    which is not a failure: you asked for this approximation.

    **Arguments:**

    - `rtol`, `atol`: the tolerance the measured residual is judged by (default: none).

    ```python
    >>> import torch, implicitfn
    >>> op = implicitfn.FunctionLinearOperator(lambda v: 1.5 * v, torch.zeros(2), tags={"symmetric"})
    >>> x, info = implicitfn.Identity().solve(op, torch.ones(2))
    >>> x, round(float(info.relative_residual), 4), info.outcome_names(), bool(info.failed)
    (tensor([1., 1.]), 0.5, ['max_steps_reached'], False)
    ```
    """

    rtol: float = 0.0
    atol: float = 0.0

    def __post_init__(self) -> None:
        check_tolerances(self)

    @property
    def fixed_steps(self) -> bool:
        return True

    def compute(self, state, vector, initial):
        return tree_map(torch.clone, vector), None, Outcome.SUCCESSFUL, step_count(0, vector)
