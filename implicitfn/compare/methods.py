"""The hypergradient methods compared: every linear solver implicitfn exports, plus unrolling.

Solvers are found, not listed: every concrete
[`AbstractLinearSolver`][implicitfn.AbstractLinearSolver] in `implicitfn.__all__` takes part.
Each runs with its own defaults except for the fields the sweep sets by name (`SweptFields`):
the budget (`max_steps` or `rank`), the tolerance `rtol`, the step `alpha` and the
minibatches `batches`. A solver whose fields follow these conventions needs no change here; one
whose budget has another name needs one entry in `BUDGET_FIELDS`, and a configuration worth
comparing besides the defaults is one entry in `VARIANTS`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import implicitfn

__all__ = ["method_names"]

UNROLLED = "Unrolled"
CURVATURES = {"Hessian": implicitfn.Hessian(), "GaussNewton": implicitfn.GaussNewton()}
# The field that sets how many operator products a solver may spend, in order of preference.
BUDGET_FIELDS = ("max_steps", "rank")
# Configurations worth comparing besides each solver's defaults: name -> (class, fixed fields).
VARIANTS: dict[str, tuple[type, dict[str, Any]]] = {
    "CG-jacobi": (implicitfn.CG, {"preconditioner": "jacobi"}),
}


@dataclasses.dataclass(frozen=True)
class SweptFields:
    """The values the sweep gives every solver that has a field of that name."""

    rtol: float
    alpha: float | str
    batches: tuple[tuple[Any, ...], ...]


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the comparison: a configured solver and curvature, or unrolling, at a budget."""

    name: str
    curvature: str | None  # None for unrolled differentiation
    steps: int | None  # None for solvers without a budget (Dense, Identity)
    solver: implicitfn.AbstractLinearSolver | None = None
    skipped: str = ""  # why this row does not run


def solver_classes() -> dict[str, type]:
    """Every concrete linear solver in `implicitfn.__all__`, by name, in that order."""
    found = {}
    for name in implicitfn.__all__:
        candidate = getattr(implicitfn, name)
        if (
            inspect.isclass(candidate)
            and issubclass(candidate, implicitfn.AbstractLinearSolver)
            and not inspect.isabstract(candidate)
        ):
            found[name] = candidate
    return found


def method_names() -> list[str]:
    """The names `CompareConfig(solvers=...)` and `--solvers` accept.

    Every linear solver that implicitfn exports (found at run time, so a new solver takes part
    without changes to the comparison), the named variants, and `"Unrolled"` (reverse mode
    through gradient-descent steps, [`unrolled_hypergradient`][implicitfn.unrolled_hypergradient]).

    ```python
    >>> from implicitfn.compare import method_names
    >>> {"CG", "Neumann", "FixedPoint", "Dense", "Identity", "Unrolled"} <= set(method_names())
    True
    ```
    """
    return [*solver_classes(), *VARIANTS, UNROLLED]


def budget_field(cls: type) -> str | None:
    names = {field.name for field in dataclasses.fields(cls)}
    return next((name for name in BUDGET_FIELDS if name in names), None)


def configure(
    cls: type, fixed: dict[str, Any], steps: int | None, swept: SweptFields
) -> implicitfn.AbstractLinearSolver:
    """`cls` with its defaults, `fixed`, the budget `steps` and the swept fields it has."""
    names = {field.name for field in dataclasses.fields(cls)}
    values = dict(fixed)
    budget = budget_field(cls)
    if budget is not None:
        values[budget] = steps
        if "rtol" in names:  # a direct solver's rtol is a check of its own, left alone
            values["rtol"] = swept.rtol  # every row is judged against the same tolerance
    if "alpha" in names:
        values["alpha"] = swept.alpha
    if "batches" in names:
        if not swept.batches:
            raise ValueError("the problem has no minibatches (Problem.batches is empty)")
        values["batches"] = swept.batches
    return cls(**values)


def plan(
    names: tuple[str, ...],
    curvatures: tuple[str, ...],
    steps: tuple[int, ...],
    swept: SweptFields,
    *,
    gauss_newton_possible: bool,
    dense_possible: bool,
) -> list[Method]:
    """The rows to run, in report order; rows that cannot run carry the reason."""
    classes = solver_classes()
    methods = []
    for name in names:
        if name == UNROLLED:
            methods += [Method(UNROLLED, None, k) for k in steps]
            continue
        cls, fixed = VARIANTS.get(name, (classes.get(name), {}))
        budgets = steps if budget_field(cls) is not None else (None,)
        for curvature in curvatures:
            for k in budgets:
                if curvature == "GaussNewton" and not gauss_newton_possible:
                    reason = "the training loss is not an implicitfn.CompositeLoss"
                elif cls is implicitfn.Dense and not dense_possible:
                    reason = "too many parameters to form the matrix in one vmap (max_dense_params)"
                else:
                    try:
                        methods.append(Method(name, curvature, k, configure(cls, fixed, k, swept)))
                        continue
                    except (TypeError, ValueError) as error:
                        reason = f"cannot configure {name}: {error}"
                methods.append(Method(name, curvature, k, skipped=reason))
    return methods
