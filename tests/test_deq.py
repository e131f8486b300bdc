"""Deep-equilibrium backward passes on a small contraction w = T(w, h) = tanh(W w + u):
the implicit hypergradient against finite differences, the Jacobian-free one (Identity solver)
against its closed form and its reported residual against a dense computation, and the unrolled
adjoint converging to the implicit answer."""

from __future__ import annotations

import pytest
import torch

import implicitfn

F64 = torch.float64
DIM = 5


def mapping(w, h):
    return torch.tanh(h["W"] @ w + h["u"])


def outer(w, h, a):
    return a @ w + 0.5 * (w**2).sum()


def problem(norm=0.6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w_matrix = torch.randn(DIM, DIM, generator=gen, dtype=F64)
    w_matrix *= norm / torch.linalg.matrix_norm(w_matrix, ord=2)  # tanh' <= 1: a contraction
    hparams = {"W": w_matrix, "u": torch.randn(DIM, generator=gen, dtype=F64)}
    a = torch.randn(DIM, generator=gen, dtype=F64)
    return hparams, a


def solve(h, steps=200):
    w = torch.zeros(DIM, dtype=F64)
    with torch.no_grad():
        for _ in range(steps):  # 0.6^200: converged to rounding
            w = mapping(w, h)
    return w


def hypergradient(adjoint, h, a):
    condition = implicitfn.fixed_point(mapping)
    return implicitfn.hypergradient(condition, outer, solve(h), h, outer_args=(a,), adjoint=adjoint)


def flat(tree):
    return torch.cat([tree["W"].flatten(), tree["u"]])


def implicit(h, a):
    adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.GMRES(rtol=1e-13, atol=0.0))
    gradient, info = hypergradient(adjoint, h, a)
    assert info.successful
    return flat(gradient)


def test_implicit_matches_finite_differences():
    h, a = problem()
    gradient = implicit(h, a)
    base, eps, expected = flat(h), 1e-6, []
    for i in range(base.numel()):
        values = []
        for sign in (1, -1):
            shifted = base.clone()
            shifted[i] += sign * eps
            hs = {"W": shifted[: DIM * DIM].reshape(DIM, DIM), "u": shifted[DIM * DIM :]}
            values.append(outer(solve(hs), hs, a))
        expected.append((values[0] - values[1]) / (2 * eps))
    torch.testing.assert_close(gradient, torch.stack(expected), rtol=1e-6, atol=1e-8)


def test_jacobian_free_is_the_closed_form_and_reports_its_error():
    h, a = problem()
    w = solve(h)
    w_bar = a + w  # dL/dw
    gradient, info = hypergradient(implicitfn.ImplicitAdjoint(solver=implicitfn.Identity()), h, a)

    # F = w - T, so B = -dT/dh and -B^T v with v = w_bar (no solve) is (dT/dh)^T w_bar.
    leaves = {k: v.clone().requires_grad_() for k, v in h.items()}
    expected = torch.autograd.grad(mapping(w, leaves), list(leaves.values()), w_bar)
    torch.testing.assert_close(flat(gradient), torch.cat([g.flatten() for g in expected]))
    assert int(info.num_steps) == 0 and not bool(info.failed)

    # Its residual ||w_bar - A^T w_bar|| is ||(dT/dw)^T w_bar||, with dT/dw built densely.
    jacobian = torch.func.jacrev(mapping)(w, h)
    dropped = torch.linalg.vector_norm(jacobian.T @ w_bar)
    torch.testing.assert_close(info.residual_norm, dropped)
    torch.testing.assert_close(info.relative_residual, dropped / w_bar.norm())

    # An approximation, not the answer: a different gradient, but in a nearby direction.
    exact = implicit(h, a)
    cosine = flat(gradient) @ exact / (flat(gradient).norm() * exact.norm())
    assert not torch.allclose(flat(gradient), exact, rtol=1e-3)
    assert cosine > 0.5


def test_one_unrolled_step_is_jacobian_free():
    h, a = problem()
    free, _ = hypergradient(implicitfn.ImplicitAdjoint(solver=implicitfn.Identity()), h, a)
    one, info = hypergradient(implicitfn.UnrolledAdjoint(steps=1, learning_rate=1.0), h, a)
    assert info is None
    torch.testing.assert_close(flat(one), flat(free))


@pytest.mark.parametrize("norm", [0.3, 0.9])
def test_unrolled_approaches_implicit(norm):
    h, a = problem(norm=norm)
    exact = implicit(h, a)
    errors = []
    for steps in (1, 2, 5, 10, 100):
        gradient, _ = hypergradient(
            implicitfn.UnrolledAdjoint(steps=steps, learning_rate=1.0), h, a
        )
        errors.append(float((flat(gradient) - exact).norm() / exact.norm()))
    assert errors[0] > 1e-2  # one step (the Jacobian-free gradient) is visibly off
    assert all(
        later < 0.5 * earlier for earlier, later in zip(errors[:-2], errors[1:-1], strict=True)
    )
    assert errors[-1] < 1e-12  # many steps: the implicit answer, to rounding


def test_decorated_equilibrium_reports_identity_residual():
    """The same through `implicit_diff`, the way a DEQ layer uses it: the callback sees it."""
    h, a = problem()
    infos = []
    adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.Identity(), callback=infos.append)
    layer = implicitfn.implicit_diff(implicitfn.fixed_point(mapping), adjoint=adjoint)(
        lambda w0, h: solve(h)
    )
    leaves = {k: v.clone().requires_grad_() for k, v in h.items()}
    w = layer(torch.zeros(DIM, dtype=F64), leaves)
    grads = torch.autograd.grad(outer(w, leaves, a), list(leaves.values()))
    free, info = hypergradient(implicitfn.ImplicitAdjoint(solver=implicitfn.Identity()), h, a)
    torch.testing.assert_close(torch.cat([g.flatten() for g in grads]), flat(free))
    assert len(infos) == 1
    torch.testing.assert_close(infos[0].relative_residual, info.relative_residual)
