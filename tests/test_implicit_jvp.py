"""Forward mode: jvp and jacfwd through implicit_diff, and consistency with reverse mode."""

import pytest
import torch
from problems import ridge_inner
from tensordict import TensorDict

import implicitfn
from implicitfn.testing import ridge_solution


def point(d=4):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(25, d, generator=gen, dtype=torch.float64)
    y = torch.randn(25, generator=gen, dtype=torch.float64)
    penalty = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    return penalty, x, y


@pytest.mark.parametrize(
    "solver",
    [
        implicitfn.CG(rtol=1e-12),
        implicitfn.Dense(),
        implicitfn.FixedPoint(max_steps=5000, alpha=0.02, rtol=1e-11),
    ],
    ids=lambda s: type(s).__name__,
)
def test_jvp_matches_the_closed_form(solver):
    penalty, x, y = point()
    inner = ridge_inner(solver)

    def solution(p, x):
        return inner(
            TensorDict({"w": torch.zeros(4, dtype=torch.float64)}), TensorDict({"penalty": p}), x, y
        )["w"]

    tangent_p, tangent_x = (
        torch.randn(4, dtype=torch.float64),
        torch.randn(25, 4, dtype=torch.float64),
    )
    _, actual = torch.func.jvp(solution, (penalty, x), (tangent_p, tangent_x))
    _, expected = torch.func.jvp(
        lambda p, x: ridge_solution(p, x, y), (penalty, x), (tangent_p, tangent_x)
    )
    torch.testing.assert_close(actual, expected)


def test_jacfwd_equals_jacrev():
    penalty, x, y = point()
    inner = ridge_inner(implicitfn.CG(rtol=1e-12))

    def solution(p):
        return inner(
            TensorDict({"w": torch.zeros(4, dtype=torch.float64)}), TensorDict({"penalty": p}), x, y
        )["w"]

    torch.testing.assert_close(
        torch.func.jacfwd(solution)(penalty), torch.func.jacrev(solution)(penalty)
    )


def test_forward_and_reverse_are_adjoint():
    """<jvp(u), v> = <u, vjp(v)> for the implicit derivative of a non-symmetric fixed point."""
    gen = torch.Generator().manual_seed(0)
    a = 0.3 * torch.randn(5, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    mapping = lambda w, lam: torch.tanh(a @ w + b @ lam)  # noqa: E731

    @implicitfn.implicit_diff(
        implicitfn.fixed_point(mapping),
        adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.FixedPoint(max_steps=500, rtol=1e-13)),
    )
    def inner(w, lam):
        for _ in range(200):
            w = mapping(w, lam)
        return w

    lam = torch.randn(3, dtype=torch.float64)
    u, v = torch.randn(3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    solve = lambda lam: inner(torch.zeros(5, dtype=torch.float64), lam)  # noqa: E731
    _, forward = torch.func.jvp(solve, (lam,), (u,))
    _, pullback = torch.func.vjp(solve, lam)
    (reverse,) = pullback(v)
    torch.testing.assert_close(forward @ v, u @ reverse)
