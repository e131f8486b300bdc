"""Linear operators on trees: a matrix-vector product, its transpose, and tags."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from implicitfn._tree import Tree, ravel_leaves, tree_axpy, tree_ravel, unravel_leaves

__all__ = [
    "AbstractLinearOperator",
    "FunctionLinearOperator",
    "ResamplingOperator",
    "damp",
    "POSITIVE_SEMIDEFINITE",
    "SYMMETRIC",
]

SYMMETRIC = "symmetric"
POSITIVE_SEMIDEFINITE = "positive_semidefinite"
_KNOWN_TAGS = frozenset({SYMMETRIC, POSITIVE_SEMIDEFINITE})


class AbstractLinearOperator(abc.ABC):
    r"""A linear map $A$ from trees to trees of the same structure.

    Subclasses implement [`mv`][implicitfn.AbstractLinearOperator.mv] and
    [`transpose`][implicitfn.AbstractLinearOperator.transpose], and expose `template` (a tree with
    the input structure) and `tags`: `"symmetric"` ($A = A^\top$) and `"positive_semidefinite"`.
    Solvers check the tags: [`CG`][implicitfn.CG] needs a symmetric operator.

    ```python
    >>> import torch, implicitfn
    >>> op = implicitfn.FunctionLinearOperator(lambda v: 3 * v, torch.zeros(2), tags={"symmetric"})
    >>> op.mv(torch.ones(2))
    tensor([3., 3.])
    >>> implicitfn.damp(op, 1.0).mv(torch.ones(2))
    tensor([4., 4.])
    ```
    """

    template: Tree
    tags: frozenset[str]

    @abc.abstractmethod
    def mv(self, vector: Tree) -> Tree:
        """The product $A v$ (a new tree with the structure of `vector`)."""

    @abc.abstractmethod
    def transpose(self) -> AbstractLinearOperator:
        r"""The operator $A^\top$."""

    @property
    def is_symmetric(self) -> bool:
        return SYMMETRIC in self.tags

    def as_matrix(self, chunk_size: int = 256) -> torch.Tensor:
        """The dense matrix of the operator in the flattening of [`tree_ravel`][implicitfn.tree_ravel].

        Built with one vmapped product over the basis vectors: $n$ products, $O(n^2)$ memory. For
        small problems and references only. `chunk_size` basis vectors are multiplied at a time,
        which bounds the memory of the intermediate products.
        """
        flat, unravel = tree_ravel(self.template)
        basis = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)

        def column(e: torch.Tensor) -> torch.Tensor:
            return tree_ravel(self.mv(unravel(e)))[0]

        return torch.func.vmap(column, out_dims=1, chunk_size=chunk_size)(basis)


def _check_tags(tags: Any) -> frozenset[str]:
    tags = frozenset(tags)
    unknown = tags - _KNOWN_TAGS
    if unknown:
        raise ValueError(
            f"tags: unknown tag(s) {sorted(unknown)}; use a subset of {sorted(_KNOWN_TAGS)}."
        )
    return tags


@dataclasses.dataclass(frozen=True)
class FunctionLinearOperator(AbstractLinearOperator):
    r"""A linear operator given by a function computing $A v$.

    **Arguments:**

    - `matvec`: `v -> A v` on trees with the structure of `template`.
    - `template`: a tree with the input structure (its values are not used).
    - `transpose_matvec`: `u -> A^T u`; may be omitted for operators tagged symmetric.
    - `tags`: a subset of `{"symmetric", "positive_semidefinite"}`.

    ```python
    >>> import torch, implicitfn
    >>> M = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    >>> op = implicitfn.FunctionLinearOperator(lambda v: M @ v, torch.zeros(2),
    ...                                       transpose_matvec=lambda u: M.T @ u)
    >>> op.transpose().mv(torch.tensor([1.0, 0.0]))
    tensor([2., 1.])
    ```
    """

    matvec: Callable[[Tree], Tree]
    template: Tree
    transpose_matvec: Callable[[Tree], Tree] | None = None
    tags: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not callable(self.matvec):
            raise TypeError(
                f"matvec: expected a callable v -> A v, got {type(self.matvec).__name__}."
            )
        object.__setattr__(self, "tags", _check_tags(self.tags))

    def mv(self, vector: Tree) -> Tree:
        return self.matvec(vector)

    def transpose(self) -> AbstractLinearOperator:
        if self.is_symmetric:
            return self
        if self.transpose_matvec is None:
            raise ValueError(
                "This operator is not tagged symmetric and has no transpose_matvec; pass "
                "transpose_matvec=... (or tags={'symmetric'} if A equals its transpose)."
            )
        return FunctionLinearOperator(self.transpose_matvec, self.template, self.matvec, self.tags)


@dataclasses.dataclass(frozen=True)
class AbstractWrappedOperator(AbstractLinearOperator):
    """An operator built on `self.operator` (its first field), sharing its structure and tags."""

    operator: AbstractLinearOperator

    @property
    def template(self) -> Tree:  # type: ignore[override]
        return self.operator.template

    @property
    def tags(self) -> frozenset[str]:  # type: ignore[override]
        return self.operator.tags

    def transpose(self) -> AbstractLinearOperator:
        r"""The same wrapper, its other fields kept, around $A^\top$: right for a wrapper that
        commutes with transposition (a damping, an average over ranks); others override it."""
        return dataclasses.replace(self, operator=self.operator.transpose())


@dataclasses.dataclass(frozen=True)
class DampedLinearOperator(AbstractWrappedOperator):
    r"""$A + \mu I$; made by [`damp`][implicitfn.damp]."""

    damping: float

    def mv(self, vector: Tree) -> Tree:
        return tree_axpy(self.damping, vector, self.operator.mv(vector))

    def as_matrix(self, chunk_size: int = 256) -> torch.Tensor:
        # The wrapped operator's own (possibly cheaper) matrix, plus mu I.
        matrix = self.operator.as_matrix(chunk_size)
        return matrix + self.damping * torch.eye(
            len(matrix), dtype=matrix.dtype, device=matrix.device
        )


@dataclasses.dataclass(frozen=True)
class RaveledOperator(AbstractLinearOperator):
    r"""An operator on lists of tensors, applied to their concatenation: one flat vector.

    The backward pass solves on it, so that every solver step is a handful of single-tensor
    kernels (a dot product, a fused $\alpha x + y$) instead of one kernel per leaf and a tree
    walk per operation. The leaves must share a dtype and a device (`_tree.can_ravel`).
    """

    operator: AbstractLinearOperator
    shapes: tuple[torch.Size, ...]
    template: torch.Tensor  # type: ignore[misc]

    @property
    def tags(self) -> frozenset[str]:  # type: ignore[override]
        return self.operator.tags

    def mv(self, vector: Tree) -> Tree:
        return ravel_leaves(self.operator.mv(unravel_leaves(vector, self.shapes)))

    def transpose(self) -> AbstractLinearOperator:
        transposed = self.operator.transpose()
        return (
            self
            if transposed is self.operator
            else RaveledOperator(transposed, self.shapes, self.template)
        )


@dataclasses.dataclass(frozen=True)
class ResamplingOperator(AbstractWrappedOperator):
    r"""An operator $A$ that can also be rebuilt on other data, $A_{\mathrm{batch}}$.

    [`implicit_diff`][implicitfn.implicit_diff] and [`hypergradient`][implicitfn.hypergradient]
    give every solver one of these: it is the Jacobian of the optimality condition on the
    arguments the inner problem was solved with, and [`at`][implicitfn.ResamplingOperator.at]
    builds the same Jacobian at the same point $(w^*, \lambda)$ with the condition's extra
    arguments replaced by a batch (with the same damping and transposition). Solvers that do not
    resample use it as an ordinary operator. Build one to call
    [`StochasticNeumann`][implicitfn.StochasticNeumann] directly.

    **Arguments:**

    - `operator`: $A$ (on all the data).
    - `linearize`: `(*batch) -> AbstractLinearOperator`, the operator on a batch, with the
      structure and tags of `operator`.

    ```python
    >>> import torch, implicitfn
    >>> def hessian_on(x):                      # curvature of a least-squares loss on rows x
    ...     return implicitfn.FunctionLinearOperator(lambda v: x.T @ (x @ v) / len(x),
    ...                                         torch.zeros(2), tags={"symmetric"})
    >>> data = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> op = implicitfn.ResamplingOperator(hessian_on(data), hessian_on)
    >>> op.mv(torch.ones(2)), op.at((data[:1],)).mv(torch.ones(2))
    (tensor([0.5000, 2.0000]), tensor([1., 0.]))
    ```
    """

    linearize: Callable[..., AbstractLinearOperator]

    def __post_init__(self) -> None:
        if not isinstance(self.operator, AbstractLinearOperator):
            raise TypeError(
                f"operator: expected an AbstractLinearOperator, got {type(self.operator).__name__}."
            )
        if not callable(self.linearize):
            raise TypeError(
                "linearize: expected a callable (*batch) -> AbstractLinearOperator, got "
                f"{type(self.linearize).__name__}."
            )

    def mv(self, vector: Tree) -> Tree:
        return self.operator.mv(vector)

    def as_matrix(self, chunk_size: int = 256) -> torch.Tensor:
        # The wrapped operator may build its matrix with fewer products (a support restriction).
        return self.operator.as_matrix(chunk_size)

    def transpose(self) -> AbstractLinearOperator:
        linearize = self.linearize
        return ResamplingOperator(
            self.operator.transpose(), lambda *batch: linearize(*batch).transpose()
        )

    def at(self, batch: Any) -> AbstractLinearOperator:
        """The operator on `batch`: a tuple or list is spread as the condition's `*args`, any
        other object is its single extra argument."""
        args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        operator = self.linearize(*args)
        if not isinstance(operator, AbstractLinearOperator):
            raise TypeError(
                f"linearize: must return an AbstractLinearOperator, got {type(operator).__name__}."
            )
        return operator


def damp(operator: AbstractLinearOperator, damping: float) -> AbstractLinearOperator:
    r"""The damped operator $A + \mu I$ (Tikhonov / Levenberg-Marquardt damping).

    Damping makes a PSD curvature positive definite and shrinks the solution; it trades bias for
    a better-conditioned solve.

    **Arguments:**

    - `operator`: an [`AbstractLinearOperator`][implicitfn.AbstractLinearOperator].
    - `damping`: $\mu \ge 0$.

    **Returns:** an operator with the same tags; `operator` itself when `damping == 0`.

    ```python
    >>> import torch, implicitfn
    >>> op = implicitfn.FunctionLinearOperator(lambda v: v, torch.zeros(1), tags={"symmetric"})
    >>> implicitfn.damp(op, 0.5).mv(torch.ones(1))
    tensor([1.5000])
    ```
    """
    if not isinstance(operator, AbstractLinearOperator):
        raise TypeError(
            f"operator: expected an AbstractLinearOperator, got {type(operator).__name__}."
        )
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"damping: expected a float >= 0, got {type(damping).__name__}.")
    if not damping >= 0:
        raise ValueError(f"damping: must be >= 0 (got {damping}); use 0 for no damping.")
    return operator if damping == 0 else DampedLinearOperator(operator, float(damping))
