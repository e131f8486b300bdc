"""Bilevel test problems with reference hypergradients."""

from __future__ import annotations

import torch
from tensordict import TensorDict

import implicitfn
from implicitfn.testing import ridge_loss, ridge_solution


def ridge_inner(solver, **options):
    """The ridge problem's exact inner solve, decorated."""

    @implicitfn.implicit_diff(
        implicitfn.stationarity(ridge_loss),
        adjoint=implicitfn.ImplicitAdjoint(solver=solver, **options),
    )
    def inner(params, hparams, x, y):
        return TensorDict({"w": ridge_solution(hparams["penalty"], x, y)})

    return inner


def logistic_loss(params, hparams, x, y):
    logits = x @ params["w"] + params["b"]
    data = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    return data + 0.5 * (hparams["log_penalty"].exp() * params["w"] ** 2).sum()


def newton_minimise(loss, params, hparams, *args, steps=30):
    """A tight inner solve for small smooth problems (Newton's method on the raveled params)."""
    flat, unravel = implicitfn.tree_ravel(params)
    for _ in range(steps):
        value = lambda v: loss(unravel(v), hparams, *args)  # noqa: E731
        gradient = torch.func.grad(value)(flat)
        flat = flat - torch.linalg.solve(torch.func.hessian(value)(flat), gradient)
    return unravel(flat)


def logistic_data(n=60, d=4, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    y = (
        x @ torch.randn(d, generator=gen, dtype=dtype)
        + 0.5 * torch.randn(n, generator=gen, dtype=dtype)
        > 0
    ).to(dtype)
    return x, y
