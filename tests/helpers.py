"""Shared test helpers: tolerances by dtype, tree comparison, solver lists, problems, the
caller's tensors left untouched, inner solvers written the torch.optim way."""

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


def ravel_tree(tree):
    """`(vector, unravel)`: the tensor leaves of any pytree (tensor, tuple, list, dict,
    TensorDict; None leaves kept) as one float64 vector, and its inverse. Written with
    torch's pytree only, so that the dense oracles below share no code with implicitfn."""
    flat, spec = pytree.tree_flatten(tree)
    tensors = [leaf for leaf in flat if isinstance(leaf, torch.Tensor)]
    vector = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])

    def unravel(v):
        leaves, start = [], 0
        for leaf in flat:
            if isinstance(leaf, torch.Tensor):
                leaves.append(v[start : start + leaf.numel()].reshape(leaf.shape))
                start += leaf.numel()
            else:
                leaves.append(leaf)
        return pytree.tree_unflatten(leaves, spec)

    return vector, unravel


def forward_over_reverse_hessian(fn):
    """`jacfwd(grad(fn))`, the Hessian in its first argument. `torch.func.hessian` is
    `jacfwd(jacrev(fn))`; measured with torch 2.13, its inner `vmap` makes the mixed
    (BatchNorm weight, BatchNorm input) block wrong (not even symmetric) for `batch_norm` in
    training mode, while `jacfwd(grad)`, `jacrev(grad)` and plain autograd agree."""
    return torch.func.jacfwd(torch.func.grad(fn))


def dense_implicit_hypergradient(
    train_loss, outer_loss, solution, inputs, hessian=None, matrix=None
):
    r"""The implicit function theorem with dense float64 matrices, at `solution`:
    $\frac{dL_V}{dz} = \frac{\partial L_V}{\partial z} - B^\top H^{-1} \frac{\partial L_V}{\partial w}$,
    $H = \nabla^2_w L_T$ (`torch.func.hessian` on the raveled params, or `hessian(fn)`, or the
    given `matrix` in the order of `ravel_tree(solution)`: a Gauss-Newton matrix, say),
    $B = \partial^2 L_T / \partial w\, \partial z$ (`torch.func.jacrev` of the gradient).

    `train_loss(w, z)` and `outer_loss(w, z)` take the params tree and the tree `z` of inputs
    to differentiate (hyperparameters, data); the result has the structure of `inputs`.
    """
    w, unravel_w = ravel_tree(solution)
    z, unravel_z = ravel_tree(inputs)

    def train(w_, z_):
        return train_loss(unravel_w(w_), unravel_z(z_))

    def outer(w_, z_):
        return outer_loss(unravel_w(w_), unravel_z(z_))

    if matrix is None:
        matrix = (torch.func.hessian if hessian is None else hessian)(train)(w, z)
    mixed = torch.func.jacrev(torch.func.grad(train), argnums=1)(w, z)  # (n_w, n_z)
    outer_w, outer_z = torch.func.grad(outer, argnums=(0, 1))(w, z)
    return unravel_z(outer_z - mixed.T @ torch.linalg.solve(matrix, outer_w))


def relative_error(actual, expected) -> float:
    """`||actual - expected|| / ||expected||` over all tensor leaves of two trees, in float64."""
    a, _ = ravel_tree(actual)
    e, _ = ravel_tree(expected)
    return float(torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e))


def snapshot(tree):
    """(value, version counter, requires_grad) of every tensor leaf of `tree`, to check later
    with `assert_untouched` that nothing of the caller's was changed."""
    leaves = [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
    return [(t.detach().clone(), t._version, t.requires_grad) for t in leaves]


def assert_untouched(tree, before) -> None:
    """No tensor of `tree` changed since `before = snapshot(tree)`: values, in-place writes and
    requires_grad flags alike."""
    after = snapshot(tree)
    assert len(after) == len(before)
    for (value, version, flag), (value0, version0, flag0) in zip(after, before, strict=True):
        assert torch.equal(value, value0), "a tensor of the caller changed"
        assert version == version0, "a tensor of the caller was modified in place"
        assert flag == flag0, "requires_grad of a tensor of the caller changed"


def storage(tree) -> set[int]:
    """The storages of the tensor leaves of `tree`: `storage(a) & storage(b)` is empty when no
    tensor of one aliases a tensor of the other."""
    return {
        t.untyped_storage().data_ptr()
        for t in pytree.tree_leaves(tree)
        if isinstance(t, torch.Tensor)
    }


def lbfgs_in_place(train_loss, max_iter=500, tolerance_grad=1e-10, tolerance_change=0.0):
    """The torch.optim habit, as an inner solver to decorate: `fit(params, hparams, x, y)`
    trains the TensorDict `params` it is given in place (requires_grad_, L-BFGS with a strong
    Wolfe line search, closure, backward) and returns them detached."""

    def fit(params, hparams, x, y):
        params.requires_grad_()
        optimizer = torch.optim.LBFGS(
            params.values(True, True),
            max_iter=max_iter,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            line_search_fn="strong_wolfe",
        )

        def closure():
            optimizer.zero_grad()
            loss = train_loss(params, hparams, x, y)
            loss.backward()
            return loss

        optimizer.step(closure)
        return params.detach()

    return fit


def adam_in_place(train_loss, steps, lr=1e-2):
    """As `lbfgs_in_place`, with `steps` full-batch steps of Adam (learning rate `lr`): on a
    network, a point short of the optimum, as users get it."""

    def fit(params, hparams, x, y):
        params.requires_grad_()
        optimizer = torch.optim.Adam(params.values(True, True), lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            train_loss(params, hparams, x, y).backward()
            optimizer.step()
        return params.detach()

    return fit
