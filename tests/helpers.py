"""Shared test helpers: tolerances by dtype, tree comparison, solver lists, problems."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from tensordict import TensorDict

import implicitfn

# One place for tolerances: (rtol, atol) by dtype.
TOLERANCES = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5)}
# Solvers that reach 1e-12 relative residual on a float64 SPD system of condition <= 1e3.
SYMMETRIC_SOLVERS = [
    implicitfn.CG(max_steps=500, rtol=1e-12),
    implicitfn.MINRES(max_steps=500, rtol=1e-12),
    implicitfn.GMRES(max_steps=500, restart=50, rtol=1e-12),
    implicitfn.Dense(rtol=1e-12),
    implicitfn.FixedPoint(max_steps=100_000, rtol=1e-12, alpha="auto"),
]


def assert_trees_close(actual, expected, rtol=None, atol=None, dtype=torch.float64) -> None:
    default_rtol, default_atol = TOLERANCES[dtype]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    flat_a, spec_a = pytree.tree_flatten(actual)
    flat_e, spec_e = pytree.tree_flatten(expected)
    assert len(flat_a) == len(flat_e), (spec_a, spec_e)
    for a, e in zip(flat_a, flat_e, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def outcome(info) -> implicitfn.Outcome:
    """The outcome of an unbatched solve, as the enum member."""
    return implicitfn.Outcome(int(info.outcome))


def clone_tree(tree):
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def assert_unchanged(before, after) -> None:
    for a, b in zip(pytree.tree_leaves(before), pytree.tree_leaves(after), strict=True):
        assert torch.equal(a, b)


def matrix_operator(matrix: torch.Tensor, template, tags=("symmetric",)):
    """An operator on trees shaped like `template` that multiplies by `matrix` in raveled space."""
    _, unravel = implicitfn.tree_ravel(template)

    def matvec(v):
        return unravel(matrix @ implicitfn.tree_ravel(v)[0])

    def transpose_matvec(v):
        return unravel(matrix.T @ implicitfn.tree_ravel(v)[0])

    return implicitfn.FunctionLinearOperator(matvec, template, transpose_matvec, frozenset(tags))


def ridge_data(n=40, d=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    y = x @ torch.randn(d, generator=gen, dtype=dtype) + 0.5 * torch.randn(
        n, generator=gen, dtype=dtype
    )
    x_val = torch.randn(n, d, generator=gen, dtype=dtype)
    y_val = torch.randn(n, generator=gen, dtype=dtype)
    return x, y, x_val, y_val


def td(**tensors) -> TensorDict:
    return TensorDict(tensors)
