"""A Nyström preconditioner kept by the adjoint across solves (NystromPreconditioner)."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import relative_error
from tensordict import TensorDict

import implicitfn

DTYPE = torch.float64


def ridge(scale_range: float = 2.0, seed: int = 0):
    """Ridge regression with badly scaled features (condition ~1e4-1e5) and a decay per weight:
    `(inner, outer, solve(decay) -> w*)`, parameters as a TensorDict of two leaves."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, scale_range, 40, dtype=DTYPE)
    x = torch.randn(300, 40, generator=generator, dtype=DTYPE) * scales
    y = torch.randn(300, generator=generator, dtype=DTYPE)
    x_val, y_val = x[:30] + 0.1, y[:30]

    def predict(w, inputs):
        return inputs[:, :30] @ w["a"] + inputs[:, 30:] @ w["b"]

    def inner(w, decay):
        penalty = (decay[:30] * w["a"] ** 2).sum() + (decay[30:] * w["b"] ** 2).sum()
        return 0.5 * ((predict(w, x) - y) ** 2).mean() + 0.5 * penalty

    def outer(w, decay):
        return ((predict(w, x_val) - y_val) ** 2).mean()

    def solve(decay):
        matrix = x.T @ x / len(x) + torch.diag(decay)
        flat = torch.linalg.solve(matrix, x.T @ y / len(x))
        return TensorDict(a=flat[:30], b=flat[30:])

    return inner, outer, solve


def hypergradients(adjoint, decays, scale_range=2.0):
    inner, outer, solve = ridge(scale_range)
    results = []
    for decay in decays:
        results.append(implicitfn.hypergradient(inner, outer, solve(decay), decay, adjoint=adjoint))
    return results


DECAYS = [torch.full((40,), 1e-2, dtype=DTYPE) * (1 + 0.05 * k) for k in range(5)]
CG = implicitfn.CG(max_steps=2000, rtol=1e-10)


def test_reused_preconditioner_same_answers_fewer_steps():
    plain = hypergradients(implicitfn.ImplicitAdjoint(solver=CG, inner_rtol=None), DECAYS)
    adjoint = implicitfn.ImplicitAdjoint(
        solver=CG, inner_rtol=None, preconditioner=implicitfn.NystromPreconditioner(rank=20)
    )
    reused = hypergradients(adjoint, DECAYS)
    for (expected, _), (actual, info) in zip(plain, reused, strict=True):
        assert bool(info.successful)
        assert relative_error(actual, expected) < 1e-7
    plain_steps = sum(int(info.num_steps) for _, info in plain)
    reused_steps = sum(int(info.num_steps) for _, info in reused)  # the build's 20 included
    assert reused_steps < plain_steps / 2, (plain_steps, reused_steps)
    assert adjoint.preconditioner_builds == 1  # built once: the system moved little


def test_rebuilt_when_the_solves_grow():
    """Built where a huge decay on half the weights dominates the spectrum, the preconditioner
    is useless once that decay is gone: the steps beyond the first solve's exceed a build's 20
    products, and the next solve rebuilds it (and is short again)."""
    counts = []
    adjoint = implicitfn.ImplicitAdjoint(
        solver=CG,
        inner_rtol=None,
        preconditioner=implicitfn.NystromPreconditioner(rank=20),
        callback=lambda info: counts.append(int(info.num_steps)),
    )
    small = torch.full((40,), 1e-3, dtype=DTYPE)
    dominated = torch.cat([torch.full((20,), 1e4, dtype=DTYPE), small[20:]])
    hypergradients(adjoint, [dominated, small, small, small])
    assert adjoint.preconditioner_builds == 2, counts
    first, stale, rebuilt, kept = counts
    assert stale - (first - 20) >= 20  # the build's 20 products are in the first count
    assert rebuilt - 20 < stale and kept < stale


def test_forward_mode_uses_it_and_agrees():
    inner, outer, solve = ridge()
    decay = DECAYS[0]
    tangent = torch.linspace(-1, 1, 40, dtype=DTYPE)

    def direction(adjoint):
        solver = implicitfn.implicit_diff(implicitfn.stationarity(inner), adjoint=adjoint)(
            lambda w, h: solve(h)
        )
        return torch.func.jvp(lambda h: solver(solve(h), h)["a"], (decay,), (tangent,))[1]

    plain = direction(implicitfn.ImplicitAdjoint(solver=CG, inner_rtol=None))
    adjoint = implicitfn.ImplicitAdjoint(
        solver=CG, inner_rtol=None, preconditioner=implicitfn.NystromPreconditioner(rank=20)
    )
    assert relative_error(direction(adjoint), plain) < 1e-7
    assert adjoint.preconditioner_builds == 1


def test_vmapped_solves_do_not_use_it():
    inner, outer, solve = ridge()
    adjoint = implicitfn.ImplicitAdjoint(
        solver=CG, inner_rtol=None, preconditioner=implicitfn.NystromPreconditioner(rank=20)
    )
    solver = implicitfn.implicit_diff(implicitfn.stationarity(inner), adjoint=adjoint)(
        lambda w, h: solve(h)
    )

    def loss(decay):
        return outer(solver(solve(decay), decay), decay)

    batch = torch.stack(DECAYS[:3])
    batched = torch.func.vmap(torch.func.grad(loss))(batch)
    looped = torch.stack([torch.func.grad(loss)(d) for d in DECAYS[:3]])
    torch.testing.assert_close(batched, looped, rtol=1e-7, atol=1e-12)
    assert adjoint.preconditioner_builds == 1  # by the loop only


@pytest.mark.parametrize(
    "options, match",
    [
        ({"solver": implicitfn.MINRES()}, "needs a solver that accepts one"),
        ({"solver": implicitfn.CG(preconditioner="jacobi")}, "has none of its own"),
        ({"solver": implicitfn.CG(max_steps=10, rtol=0), "compile": True}, "compile"),
    ],
)
def test_bad_combinations_raise_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        implicitfn.ImplicitAdjoint(preconditioner=implicitfn.NystromPreconditioner(), **options)


def test_default_solver_that_takes_none_raises_at_decoration():
    adjoint = implicitfn.ImplicitAdjoint(preconditioner=implicitfn.NystromPreconditioner())
    loss = lambda w, h: (w.tanh() ** 2).sum() + h * (w**2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="default for Stationarity with Hessian is MINRES"):
        implicitfn.implicit_diff(implicitfn.stationarity(loss), adjoint=adjoint)
    # Declared convex: the default is CG, which takes it.
    implicitfn.implicit_diff(implicitfn.stationarity(loss, convex=True), adjoint=adjoint)


def test_no_preconditioner_no_builds():
    assert implicitfn.ImplicitAdjoint().preconditioner_builds == 0


def test_bad_configuration_raises():
    with pytest.raises(TypeError, match="NystromPreconditioner"):
        implicitfn.ImplicitAdjoint(solver=CG, preconditioner=lambda r: r)
    with pytest.raises(ValueError, match="sketch"):
        implicitfn.NystromPreconditioner(sketch="orthogonal")
    with pytest.raises(ValueError, match="rank"):
        implicitfn.NystromPreconditioner(rank=0)


def spread_ridge(penalised: slice = slice(None)):
    """Ridge regression with 60 weights but 8 training examples (a data curvature of rank 8, as
    in a network with more weights than examples) and decays spanning 1e-4..1e2 (as after many
    hyper-steps), stated as a CompositeLoss: `(inner, outer, solve, decay)`; only the weights
    in `penalised` carry a decay."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(8, 60, generator=generator, dtype=DTYPE)
    y = torch.randn(8, generator=generator, dtype=DTYPE)
    x_val = torch.randn(40, 60, generator=generator, dtype=DTYPE)
    y_val = torch.randn(40, generator=generator, dtype=DTYPE)
    decay = torch.logspace(-4, 2, 60, dtype=DTYPE)[torch.randperm(60, generator=generator)]
    mask = torch.zeros(60, dtype=DTYPE)
    mask[penalised] = 1.0
    inner = implicitfn.CompositeLoss(
        predict=lambda w, h: x @ w["w"],
        output_loss=lambda out, h: 0.5 * ((out - y) ** 2).mean(),
        penalty=lambda w, h: 0.5 * (mask * h * w["w"] ** 2).sum(),
    )

    def outer(w, h):
        return ((x_val @ w["w"] - y_val) ** 2).mean()

    def solve(h):
        matrix = x.T @ x / len(x) + torch.diag(mask * h)
        return TensorDict(w=torch.linalg.solve(matrix, x.T @ y / len(x)))

    return inner, outer, solve, decay


@pytest.mark.parametrize("penalised", [slice(None), slice(0, 55)])
def test_penalty_scaling_same_answers_far_fewer_steps(penalised):
    """Decays spread over six orders of magnitude: a rank-10 sketch alone helps little; scaled
    by the penalty's diagonal, the system is I + a rank-8 part that the sketch captures, and CG
    converges in a few steps; answers unchanged. With weights the penalty does not touch, their
    diagonal comes from one product of A (counted)."""
    inner, outer, solve, decay = spread_ridge(penalised)
    cg = implicitfn.CG(max_steps=5000, rtol=1e-10)
    steps, answers = {}, {}
    for scaling in ("none", None, "penalty"):
        preconditioner = None
        if scaling != "none":
            preconditioner = implicitfn.NystromPreconditioner(rank=10, scaling=scaling)
        adjoint = implicitfn.ImplicitAdjoint(
            solver=cg, inner_rtol=None, preconditioner=preconditioner
        )
        grads, infos = zip(
            *[
                implicitfn.hypergradient(inner, outer, solve(h), h, adjoint=adjoint)
                for h in (decay, decay * 1.01)
            ],
            strict=True,
        )
        assert all(bool(info.successful) for info in infos)
        steps[scaling], answers[scaling] = [int(info.num_steps) for info in infos], grads
    for scaling in (None, "penalty"):
        for actual, expected in zip(answers[scaling], answers["none"], strict=True):
            assert relative_error(actual, expected) < 1e-7
    assert sum(steps["penalty"]) * 3 < sum(steps[None]), steps
    build = 10 + (penalised != slice(None))  # the probe of A for untouched weights
    assert steps["penalty"][0] - steps["penalty"][1] >= build - 2, steps  # built once, kept


def test_penalty_scaling_in_forward_mode_agrees():
    inner, outer, solve, decay = spread_ridge()
    tangent = torch.randn(60, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    results = []
    for preconditioner in (None, implicitfn.NystromPreconditioner(rank=10, scaling="penalty")):
        adjoint = implicitfn.ImplicitAdjoint(
            solver=implicitfn.CG(max_steps=5000, rtol=1e-10),
            inner_rtol=None,
            preconditioner=preconditioner,
        )
        solve_implicit = implicitfn.implicit_diff(implicitfn.stationarity(inner), adjoint=adjoint)(
            lambda w, h: solve(h)
        )
        _, derivative = torch.func.jvp(
            functools.partial(solve_implicit, solve(decay)), (decay,), (tangent,)
        )
        results.append(derivative)
    assert relative_error(results[1], results[0]) < 1e-7


def test_penalty_scaling_needs_a_stated_penalty():
    inner, outer, solve, decay = spread_ridge()
    adjoint = implicitfn.ImplicitAdjoint(
        solver=implicitfn.CG(max_steps=100, rtol=1e-6),
        preconditioner=implicitfn.NystromPreconditioner(scaling="penalty"),
    )
    plain_loss = lambda w, h: inner(w, h)  # noqa: E731 - the same loss, its split not stated
    with pytest.raises(
        ValueError, match=r"scaling='penalty' needs the training loss as .*CompositeLoss"
    ):
        implicitfn.hypergradient(plain_loss, outer, solve(decay), decay, adjoint=adjoint)
    with pytest.raises(ValueError, match=r"scaling: expected None or 'penalty'"):
        implicitfn.NystromPreconditioner(scaling="diagonal")
