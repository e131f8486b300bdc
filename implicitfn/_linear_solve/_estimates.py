"""Seeded random probes and what the solvers estimate from them.

Sketches (Nystrom), diagonals (the Jacobi preconditioner of CG) and the largest eigenvalue
(the automatic step size of Neumann, FixedPoint and StochasticNeumann) all come from here.

Random numbers come from NumPy's seeded generator rather than torch's: torch's random functions
raise inside `torch.func.vmap` unless the caller chose a `randomness=` mode, while a tensor built
from a NumPy array is an ordinary constant there. With a fixed seed every estimate is reproducible,
and each member of a vmapped batch gets the same probes as it would in a loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from implicitfn._linear_solve._base import AbstractLinearSolver, check_positive_int
from implicitfn._operator import AbstractLinearOperator
from implicitfn._tree import Tree, leaves, tree_ravel

Probes = Literal["gaussian", "rademacher", "columns"]
StepSize = float | Literal["auto"]

# The start of power iteration only has to be generic, so it is not a user setting.
_POWER_ITERATION_SEED = 0


def check_seed(seed: Any, name: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name}: expected an int, got {type(seed).__name__}.")
    if seed < 0:
        raise ValueError(f"{name}: must be >= 0 (got {seed}).")


def check_step_size(alpha: Any, power_steps: Any) -> None:
    """Validate `alpha` (a float > 0 or "auto") and `power_steps` of the series solvers."""
    if alpha != "auto" and (
        isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0
    ):
        raise ValueError(
            f"alpha: expected a float > 0 or 'auto' (estimated from the operator), got {alpha!r}."
        )
    check_positive_int(power_steps, "power_steps")


def random_matrix(
    kind: Probes, size: int, count: int, seed: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A `(size, count)` matrix of probes with the given dtype and device.

    `"gaussian"`: standard normal entries; `"rademacher"`: entries $\\pm 1$; `"columns"`: `count`
    distinct columns of the identity, chosen uniformly (needs `count <= size`).
    """
    # A copy: torch.compile cannot feed its constant itself to torch.func.vmap.
    return _seeded_values(kind, size, count, seed).to(dtype=dtype, device=device, copy=True)


# A constant for torch.compile, evaluated while tracing: NumPy does not break the graph.
@torch.compiler.assume_constant_result
def _seeded_values(kind: Probes, size: int, count: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        values = rng.standard_normal((size, count))
    elif kind == "rademacher":
        values = rng.choice(np.array([-1.0, 1.0]), size=(size, count))
    else:
        values = np.zeros((size, count))
        values[rng.choice(size, size=count, replace=False), np.arange(count)] = 1.0
    return torch.from_numpy(values)


def flat_matvec(
    operator: AbstractLinearOperator,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, Callable[[torch.Tensor], Tree]]:
    """The operator on raveled vectors: `(matvec, raveled template, unravel)`."""
    dtypes = sorted({str(leaf.dtype) for leaf in leaves(operator.template)})
    if len(dtypes) > 1:
        raise TypeError(
            f"vector: this solver works on the parameters raveled into one vector, so all leaves "
            f"must share a dtype, got {', '.join(dtypes)}; convert them with .to(dtype)."
        )
    flat, unravel = tree_ravel(operator.template)

    def matvec(vector: torch.Tensor) -> torch.Tensor:
        return tree_ravel(operator.mv(unravel(vector)))[0]

    return matvec, flat, unravel


def apply_to_columns(
    matvec: Callable[[torch.Tensor], torch.Tensor], matrix: torch.Tensor
) -> torch.Tensor:
    """$A M$ for an `(n, k)` matrix $M$: the $k$ products in one vmapped call."""
    return torch.func.vmap(matvec, in_dims=1, out_dims=1)(matrix)


def hutchinson_diagonal(operator: AbstractLinearOperator, probes: int, seed: int) -> torch.Tensor:
    r"""Hutchinson's estimate $\mathrm{diag}(A) \approx \frac1k\sum_i z_i \odot A z_i$, raveled.

    The $z_i$ have independent random signs. Unbiased, and exact for a diagonal $A$ whatever
    $k$; the error of entry $j$ has variance $\frac1k\sum_{l\neq j} A_{jl}^2$.
    Costs `probes` products in one vmapped call.
    """
    matvec, flat, _ = flat_matvec(operator)
    z = random_matrix("rademacher", flat.numel(), probes, seed, flat.dtype, flat.device)
    return (z * apply_to_columns(matvec, z)).mean(dim=1)


def max_eigenvalue(operator: AbstractLinearOperator, steps: int) -> torch.Tensor:
    r"""Power-iteration estimate of the largest $|\mu|$ over the eigenvalues $\mu$ of $A$, detached.

    Returns $\lVert A v_k\rVert$ for the normalised iterate $v_k$ after `steps` products: for a
    symmetric $A$ a lower bound on $\lambda_{\max}$ that approaches it geometrically (fast when
    the top eigenvalues are well separated, and then a single outlier dominates anyway).
    Detached, because it only chooses a step size.
    """
    matvec, flat, _ = flat_matvec(operator)
    size, dtype, device = flat.numel(), flat.dtype, flat.device
    vector = random_matrix("gaussian", size, 1, _POWER_ITERATION_SEED, dtype, device)[:, 0]
    vector = vector / torch.linalg.vector_norm(vector)
    tiny = torch.finfo(flat.dtype).tiny
    estimate = torch.zeros((), dtype=flat.dtype, device=flat.device)
    for _ in range(steps):
        image = matvec(vector)
        estimate = torch.linalg.vector_norm(image)
        vector = image / torch.clamp(estimate, min=tiny)
    return estimate.detach()


def step_size(
    alpha: StepSize, operator: AbstractLinearOperator, power_steps: int
) -> tuple[torch.Tensor | float, int]:
    r"""Resolve `alpha`: a float is used as given; `"auto"` is $1/\hat\lambda_{\max}$.

    With the power-iteration estimate $\hat\lambda_{\max} \le \lambda_{\max}$, the step
    $1/\hat\lambda_{\max}$ is below $2/\lambda_{\max}$ (the bound for a convergent series on a
    symmetric positive definite operator) whenever the estimate is within a factor 2, and it
    damps the directions of the estimated top eigenvalue in a single step.

    **Returns:** `(alpha, products)`: the step and the operator products spent choosing it.
    """
    if alpha != "auto":
        return float(alpha), 0
    estimate = max_eigenvalue(operator, power_steps)
    return 1.0 / torch.clamp(estimate, min=torch.finfo(estimate.dtype).tiny), power_steps


class AbstractStepSizeSolver(AbstractLinearSolver):
    """A solver with a step `alpha` (a float or `"auto"`) and `power_steps` fields.

    `init` resolves the step once per operator; the solve with $A^\top$ keeps it, since
    $A^\top$ has the eigenvalues of $A$. The state is `(operator, alpha, products)`.
    """

    alpha: StepSize
    power_steps: int

    def init(
        self, operator: AbstractLinearOperator
    ) -> tuple[AbstractLinearOperator, torch.Tensor | float, int]:
        return (operator, *step_size(self.alpha, operator, self.power_steps))

    def transpose(self, state, operator):
        return (operator.transpose(), *state[1:])
