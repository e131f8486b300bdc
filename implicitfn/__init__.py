"""implicitfn: hypergradients by implicit differentiation, on torch.func."""

import importlib
from typing import Any

from implicitfn._adjoint import AbstractAdjoint, ImplicitAdjoint
from implicitfn._compile import Compile, CompileWarning
from implicitfn._curvature import AbstractCurvature, CompositeLoss, GaussNewton, Hessian
from implicitfn._distributed import all_reduce_gradients
from implicitfn._functional import FunctionalModel, functional_model
from implicitfn._implicit import hypergradient, implicit_diff
from implicitfn._kkt import kkt
from implicitfn._linear_solve import (
    CG,
    GMRES,
    MINRES,
    AbstractLinearSolver,
    Dense,
    FixedPoint,
    Identity,
    Neumann,
    Nystrom,
    NystromPreconditioner,
    StochasticNeumann,
)
from implicitfn._minimize import MinimizeError, MinimizeWarning, minimize
from implicitfn._operator import (
    AbstractLinearOperator,
    FunctionLinearOperator,
    ResamplingOperator,
    damp,
)
from implicitfn._optimality import (
    AbstractOptimalityCondition,
    cross_vjp,
    fixed_point,
    root,
    stationarity,
)
from implicitfn._projections import (
    AbstractProjection,
    AbstractProx,
    projection_box,
    projection_l2_ball,
    projection_nonnegative,
    projection_simplex,
    prox_elastic_net,
    prox_group_lasso,
    prox_l1,
)
from implicitfn._proximal import projected_gradient, proximal_gradient
from implicitfn._solution import (
    ImplicitSolveError,
    ImplicitSolveWarning,
    InnerSolutionWarning,
    Outcome,
    SolveInfo,
)
from implicitfn._tree import tree_axpy, tree_norm, tree_ravel, tree_vdot, tree_zeros_like
from implicitfn._unrolled import UnrolledAdjoint, unrolled_hypergradient

__version__ = "0.1.0"

__all__ = [
    "AbstractAdjoint",
    "AbstractCurvature",
    "AbstractLinearOperator",
    "AbstractLinearSolver",
    "AbstractOptimalityCondition",
    "AbstractProjection",
    "AbstractProx",
    "CG",
    "Compile",
    "CompileWarning",
    "CompositeLoss",
    "Dense",
    "FixedPoint",
    "FunctionLinearOperator",
    "FunctionalModel",
    "GMRES",
    "GaussNewton",
    "Hessian",
    "Identity",
    "ImplicitAdjoint",
    "ImplicitSolveError",
    "ImplicitSolveWarning",
    "InnerSolutionWarning",
    "MINRES",
    "MinimizeError",
    "MinimizeWarning",
    "Neumann",
    "Nystrom",
    "NystromPreconditioner",
    "Outcome",
    "ResamplingOperator",
    "SolveInfo",
    "StochasticNeumann",
    "UnrolledAdjoint",
    "all_reduce_gradients",
    "cross_vjp",
    "damp",
    "fixed_point",
    "functional_model",
    "hyperopt",
    "hypergradient",
    "implicit_diff",
    "kkt",
    "minimize",
    "projected_gradient",
    "projection_box",
    "projection_l2_ball",
    "projection_nonnegative",
    "projection_simplex",
    "prox_elastic_net",
    "prox_group_lasso",
    "prox_l1",
    "proximal_gradient",
    "root",
    "stationarity",
    "tree_axpy",
    "tree_norm",
    "tree_ravel",
    "tree_vdot",
    "tree_zeros_like",
    "unrolled_hypergradient",
]


def __getattr__(name: str) -> Any:
    """`implicitfn.hyperopt` on first use: the application floor is not imported by the core
    (write `from implicitfn import hyperopt` to be explicit)."""
    if name == "hyperopt":
        return importlib.import_module("implicitfn.hyperopt")
    raise AttributeError(f"module 'implicitfn' has no attribute {name!r}")
