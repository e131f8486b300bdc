"""implicitfn: hypergradients by implicit differentiation, on torch.func."""

from implicitfn._compile import Compile, CompileWarning
from implicitfn._curvature import AbstractCurvature, CompositeLoss, GaussNewton, Hessian
from implicitfn._distributed import all_reduce_gradients
from implicitfn._functional import functional_model
from implicitfn._implicit import hypergradient, implicit_diff
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
    ResamplingOperator,
    StochasticNeumann,
)
from implicitfn._operator import AbstractLinearOperator, FunctionLinearOperator, damp
from implicitfn._optimality import (
    AbstractOptimalityCondition,
    cross_vjp,
    fixed_point,
    root,
    stationarity,
)
from implicitfn._solution import ImplicitSolveError, ImplicitSolveWarning, SolveInfo
from implicitfn._tree import tree_axpy, tree_norm, tree_ravel, tree_vdot, tree_zeros_like
from implicitfn._unrolled import unrolled_hypergradient

# isort: split
# The hyperopt subpackage is built on the names above, so it is imported after them.
from implicitfn import hyperopt

__version__ = "0.1.0"

__all__ = [
    "AbstractCurvature",
    "AbstractLinearOperator",
    "AbstractLinearSolver",
    "AbstractOptimalityCondition",
    "CG",
    "Compile",
    "CompileWarning",
    "CompositeLoss",
    "Dense",
    "FixedPoint",
    "FunctionLinearOperator",
    "GMRES",
    "GaussNewton",
    "Hessian",
    "Identity",
    "ImplicitSolveError",
    "ImplicitSolveWarning",
    "MINRES",
    "Neumann",
    "Nystrom",
    "ResamplingOperator",
    "SolveInfo",
    "StochasticNeumann",
    "all_reduce_gradients",
    "cross_vjp",
    "damp",
    "fixed_point",
    "functional_model",
    "hyperopt",
    "hypergradient",
    "implicit_diff",
    "root",
    "stationarity",
    "tree_axpy",
    "tree_norm",
    "tree_ravel",
    "tree_vdot",
    "tree_zeros_like",
    "unrolled_hypergradient",
]
