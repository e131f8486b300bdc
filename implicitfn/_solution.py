"""What a solve reports, the errors it raises, and the one place that reads tensor values.

Reading a tensor's value in Python (`bool(t)`) is impossible under `torch.func.vmap`; the
helpers at the bottom unwrap functorch's wrappers so that convergence and finiteness checks
still see real values there (rule 7 of the design notes keeps such reads out of solver steps).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.utils._pytree as pytree

from implicitfn._tree import leaves

__all__ = ["ImplicitSolveError", "ImplicitSolveWarning", "SolveInfo"]


@dataclasses.dataclass(frozen=True)
class SolveInfo:
    r"""What a linear solve reports about itself.

    Under `torch.func.vmap` each field carries the batch dimension (one entry per solve).

    **Fields:**

    - `residual_norm`: $\lVert b - A x\rVert_2$ of the returned solution (CG: the recursive
      residual; Neumann: the exact residual of the truncated series).
    - `rhs_norm`: $\lVert b\rVert_2$, so `residual_norm / rhs_norm` is the relative residual.
    - `num_steps`: operator products the solve spent (iterations, plus probes or power-iteration
      steps where a solver uses them; not a final residual check).
    - `converged`: the solve met its tolerance. For a fixed-step solve (`rtol=None`), it means
      the steps ran without breakdown and left a finite residual smaller than $\lVert b\rVert$.
    - `solver`: the name of the solver that produced it.

    ```python
    >>> import torch, implicitfn
    >>> op = implicitfn.FunctionLinearOperator(lambda v: 2 * v, torch.zeros(3),
    ...                                       tags={"symmetric", "positive_semidefinite"})
    >>> x, info = implicitfn.CG().solve(op, torch.ones(3))
    >>> bool(info.converged), int(info.num_steps)
    (True, 1)
    ```
    """

    residual_norm: torch.Tensor
    rhs_norm: torch.Tensor
    num_steps: torch.Tensor
    converged: torch.Tensor
    solver: str = ""

    @property
    def relative_residual(self) -> torch.Tensor:
        """`residual_norm / rhs_norm` (0 when the right-hand side is 0)."""
        return self.residual_norm / torch.clamp(
            self.rhs_norm, min=torch.finfo(self.rhs_norm.dtype).tiny
        )

    def concrete(self) -> SolveInfo:
        """A copy with plain, detached tensors, safe to keep after a transform has finished."""
        return SolveInfo(
            residual_norm=concrete(self.residual_norm),
            rhs_norm=concrete(self.rhs_norm),
            num_steps=concrete(self.num_steps),
            converged=concrete(self.converged),
            solver=self.solver,
        )

    def __str__(self) -> str:
        info = self.concrete()
        return (
            f"{info.solver}: converged={info.converged.tolist()}, steps={info.num_steps.tolist()}, "
            f"residual={info.residual_norm.tolist()}, |b|={info.rhs_norm.tolist()}"
        )


# A pytree, so that solves can return it from inside torch.func.vmap.
pytree.register_pytree_node(
    SolveInfo,
    lambda info: (
        [info.residual_norm, info.rhs_norm, info.num_steps, info.converged],
        info.solver,
    ),
    lambda values, solver: SolveInfo(*values, solver=solver),
    serialized_type_name="implicitfn.SolveInfo",
)


class ImplicitSolveError(RuntimeError):
    """The backward linear solve did not converge or produced NaN/Inf.

    The `info` attribute holds the [`SolveInfo`][implicitfn.SolveInfo]. Pass
    `on_failure="warn"` to [`implicit_diff`][implicitfn.implicit_diff] to get an
    [`ImplicitSolveWarning`][implicitfn.ImplicitSolveWarning] instead.

    ```python
    >>> import implicitfn
    >>> issubclass(implicitfn.ImplicitSolveError, RuntimeError)
    True
    ```
    """

    def __init__(self, message: str, info: SolveInfo | None = None):
        super().__init__(message)
        self.info = info


class ImplicitSolveWarning(RuntimeWarning):
    """Warning issued instead of [`ImplicitSolveError`][implicitfn.ImplicitSolveError] when
    `on_failure="warn"`.

    ```python
    >>> import implicitfn
    >>> issubclass(implicitfn.ImplicitSolveWarning, RuntimeWarning)
    True
    ```
    """


def under_transform() -> bool:
    """True inside a `torch.func` transform (vmap, grad, jvp, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def concrete(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor under any functorch wrappers (batch dims become real dims), detached.

    Private functorch API, used only to *read* values for checks, loop control and reports.
    Operations on the unwrapped tensor run with functorch disabled, or an active `grad` level
    would wrap the result again.
    """
    functorch = torch._C._functorch

    def outside_functorch(fn, t: torch.Tensor) -> torch.Tensor:
        if functorch.is_functorch_wrapped_tensor(t):
            return fn(t)
        with torch._C._DisableFuncTorch():
            return fn(t)

    while functorch.is_functorch_wrapped_tensor(tensor):
        batch_dim = functorch.maybe_get_bdim(tensor) if functorch.is_batchedtensor(tensor) else None
        tensor = functorch.get_unwrapped(tensor)
        if batch_dim is not None:
            tensor = outside_functorch(lambda t, d=batch_dim: t.movedim(d, 0), tensor)
    return outside_functorch(torch.Tensor.detach, tensor)


def all_finite(tree: Any) -> bool:
    """Whether every leaf of `tree` is free of NaN and Inf (works under transforms)."""
    return all(_finite(concrete(leaf)) for leaf in leaves(tree))


def _finite(tensor: torch.Tensor) -> bool:
    # A finite sum means every entry is finite (NaN and Inf propagate through a sum); one
    # reduction, measured 12-35x faster than `isfinite(t).all()` on 6e4-1e6 entries. A
    # non-finite sum may be an overflow of finite entries: then every entry is looked at.
    if (tensor.is_floating_point() or tensor.is_complex()) and bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())
