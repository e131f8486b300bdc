"""Linear solvers: one file per method, all on the interface of `_base`."""

from implicitfn._linear_solve._base import AbstractLinearSolver
from implicitfn._linear_solve._cg import CG
from implicitfn._linear_solve._dense import Dense
from implicitfn._linear_solve._fixed_point import FixedPoint
from implicitfn._linear_solve._gmres import GMRES
from implicitfn._linear_solve._identity import Identity
from implicitfn._linear_solve._minres import MINRES
from implicitfn._linear_solve._neumann import Neumann
from implicitfn._linear_solve._nystrom import Nystrom, NystromPreconditioner
from implicitfn._linear_solve._stochastic_neumann import StochasticNeumann

__all__ = [
    "AbstractLinearSolver",
    "CG",
    "Dense",
    "FixedPoint",
    "GMRES",
    "Identity",
    "MINRES",
    "Neumann",
    "Nystrom",
    "NystromPreconditioner",
    "StochasticNeumann",
]
