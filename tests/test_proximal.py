"""Proximal- and projected-gradient conditions, the prox/projection library, and the support
restriction: hypergradients against closed forms and finite differences, Jacobians against
smooth references, projections feasible and idempotent, misuse refused before computing."""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCES
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import prox_points

import implicitfn

F64 = torch.float64
RTOL, ATOL = TOLERANCES[F64]


# -- problems ----------------------------------------------------------------------------------


def regression_data(n=40, p=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=gen, dtype=F64)
    truth = torch.zeros(p, dtype=F64)
    truth[: p // 3] = torch.randn(p // 3, generator=gen, dtype=F64) * 2
    y = x @ truth + 0.3 * torch.randn(n, generator=gen, dtype=F64)
    x_val = torch.randn(n // 2, p, generator=gen, dtype=F64)
    y_val = x_val @ truth + 0.3 * torch.randn(n // 2, generator=gen, dtype=F64)
    return x, y, x_val, y_val


def least_squares(w, h, x, y):
    return 0.5 * ((x @ w - y) ** 2).sum() / len(y)


def iterate(mapping, w, steps):
    """`steps` fixed-point iterations of `mapping` (a proximal/projected-gradient step)."""
    with torch.no_grad():
        for _ in range(steps):
            w = mapping(w)
    return w


def elastic_net_closed_form(x, y, l1, l2, support, signs):
    """The solution with this support and these signs as a differentiable function of l1, l2."""
    n = len(y)
    xs = x[:, support]
    gram = xs.T @ xs / n + torch.diag(l2[support])
    ws = torch.linalg.solve(gram, xs.T @ y / n - l1[support] * signs[support])
    return torch.zeros(x.shape[1], dtype=x.dtype).index_put((support.nonzero()[:, 0],), ws)


def exact_elastic_net(x, y, l1, l2):
    """Support and signs by proximal gradient, values by the closed form, optimality checked."""
    n = len(y)
    step = 1 / float(torch.linalg.eigvalsh(x.T @ x / n).max() + l2.max())
    prox = implicitfn.prox_elastic_net("l1", "l2")
    h = {"l1": l1, "l2": l2}

    def mapping(w):
        return prox(w - step * x.T @ (x @ w - y) / n, step, h)

    w = iterate(mapping, torch.zeros(x.shape[1], dtype=F64), 3000)
    support = w != 0
    w = elastic_net_closed_form(x, y, l1, l2, support, torch.sign(w))
    gradient = x.T @ (x @ w - y) / n + l2 * w
    assert torch.all(gradient[~support].abs() < l1[~support] - 1e-8), "support not identified"
    torch.testing.assert_close(gradient[support], -l1[support] * torch.sign(w[support]))
    return w


def lasso_setup(seed=0):
    x, y, x_val, y_val = regression_data(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    l1 = (0.05 + 0.3 * torch.rand(x.shape[1], generator=gen, dtype=F64)) * float(
        (x.T @ y).abs().max() / len(y)
    )
    w = exact_elastic_net(x, y, l1, torch.zeros_like(l1))
    return x, y, x_val, y_val, l1, w


def validation_loss(x_val, y_val):
    return lambda w, h: 0.5 * ((x_val @ w - y_val) ** 2).mean()


def lasso_reference(x, y, outer, l1, w):
    variable = l1.clone().requires_grad_()
    solution = elastic_net_closed_form(x, y, variable, torch.zeros_like(l1), w != 0, torch.sign(w))
    return torch.autograd.grad(outer(solution, None), variable)[0]


def step_of(x):
    return 1 / float(torch.linalg.eigvalsh(x.T @ x / len(x)).max())


# -- hypergradients against closed forms --------------------------------------------------------

LASSO_SOLVERS = [
    ("restricted", implicitfn.CG(rtol=1e-12, max_steps=200)),
    ("restricted", implicitfn.MINRES(rtol=1e-12, max_steps=200)),
    ("restricted", implicitfn.GMRES(rtol=1e-12, max_steps=200)),
    ("restricted", implicitfn.Dense(rtol=1e-10)),
    ("restricted", implicitfn.FixedPoint(rtol=1e-12, max_steps=20_000)),
    ("full", implicitfn.GMRES(rtol=1e-12, max_steps=200)),
    ("full", implicitfn.Dense(rtol=1e-10)),
]


@pytest.mark.parametrize(
    "mode, solver", LASSO_SOLVERS, ids=[f"{m}-{type(s).__name__}" for m, s in LASSO_SOLVERS]
)
def test_lasso_per_feature_hypergradient_matches_closed_form(mode, solver):
    x, y, x_val, y_val, l1, w = lasso_setup()
    assert 0 < int((w != 0).sum()) < len(w)  # a proper support
    condition = implicitfn.proximal_gradient(
        least_squares, implicitfn.prox_l1(), step=step_of(x), restrict=mode == "restricted"
    )
    outer = validation_loss(x_val, y_val)
    adjoint = implicitfn.ImplicitAdjoint(solver=solver)
    gradient, info = implicitfn.hypergradient(
        condition, outer, w, l1, inner_args=(x, y), adjoint=adjoint
    )
    assert bool(info.successful)
    torch.testing.assert_close(gradient, lasso_reference(x, y, outer, l1, w), rtol=1e-7, atol=1e-9)
    assert torch.all(gradient[w == 0] == 0)  # zero coordinates do not move with their penalty


def test_plain_fixed_point_condition_agrees_and_restriction_keeps_krylov_steps():
    x, y, x_val, y_val, l1, w = lasso_setup(seed=3)
    step, outer = step_of(x), validation_loss(x_val, y_val)

    def soft_threshold_step(w, alpha, x, y):
        z = w - step * torch.func.grad(least_squares)(w, alpha, x, y)
        return torch.sign(z) * torch.relu(z.abs() - step * alpha)

    solver = implicitfn.GMRES(rtol=1e-12, max_steps=200)
    results = {}
    for name, condition in {
        "plain": implicitfn.fixed_point(soft_threshold_step),
        "restricted": implicitfn.proximal_gradient(least_squares, implicitfn.prox_l1(), step=step),
    }.items():
        adjoint = implicitfn.ImplicitAdjoint(solver=solver)
        results[name] = implicitfn.hypergradient(
            condition, outer, w, l1, inner_args=(x, y), adjoint=adjoint
        )
    torch.testing.assert_close(results["plain"][0], results["restricted"][0], rtol=1e-8, atol=1e-10)
    support = int((w != 0).sum())
    assert int(results["restricted"][1].num_steps) <= support + 1  # identity off the support


def test_elastic_net_per_feature_hypergradient_matches_closed_form():
    x, y, x_val, y_val = regression_data(seed=1)
    gen = torch.Generator().manual_seed(5)
    scale = float((x.T @ y).abs().max() / len(y))
    l1 = (0.05 + 0.3 * torch.rand(x.shape[1], generator=gen, dtype=F64)) * scale
    l2 = 0.5 * torch.rand(x.shape[1], generator=gen, dtype=F64)
    w = exact_elastic_net(x, y, l1, l2)
    outer = validation_loss(x_val, y_val)
    condition = implicitfn.proximal_gradient(
        least_squares, implicitfn.prox_elastic_net("l1", "l2"), step=step_of(x)
    )
    assert not condition.symmetric  # per-feature l2: use GMRES
    adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.GMRES(rtol=1e-12, max_steps=200))
    hparams = {"l1": l1, "l2": l2}
    gradient, _ = implicitfn.hypergradient(
        condition, outer, w, hparams, inner_args=(x, y), adjoint=adjoint
    )
    variables = {k: v.clone().requires_grad_() for k, v in hparams.items()}
    solution = elastic_net_closed_form(
        x, y, variables["l1"], variables["l2"], w != 0, torch.sign(w)
    )
    expected = torch.autograd.grad(outer(solution, None), [variables["l1"], variables["l2"]])
    torch.testing.assert_close(gradient["l1"], expected[0], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(gradient["l2"], expected[1], rtol=1e-7, atol=1e-10)


def test_lasso_through_the_decorator_forward_and_reverse_and_vmap():
    x, y, x_val, y_val, l1, w = lasso_setup(seed=2)
    outer = validation_loss(x_val, y_val)
    condition = implicitfn.proximal_gradient(least_squares, implicitfn.prox_l1(), step=step_of(x))
    adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.CG(rtol=1e-12, max_steps=200))

    @implicitfn.implicit_diff(condition, adjoint=adjoint)
    def lasso(params, alpha, x, y):  # returns the precomputed solution: any solver would do
        return w.clone()

    def objective(alpha):
        return outer(lasso(torch.zeros_like(w), alpha, x, y), None)

    reference = lasso_reference(x, y, outer, l1, w)
    torch.testing.assert_close(torch.func.grad(objective)(l1), reference, rtol=1e-8, atol=1e-10)
    direction = torch.randn_like(l1)
    _, tangent = torch.func.jvp(objective, (l1,), (direction,))
    torch.testing.assert_close(tangent, reference @ direction, rtol=1e-8, atol=1e-10)
    batch = torch.stack([l1, l1 * (1 + 1e-9), l1])  # vmap: one support mask per problem
    torch.testing.assert_close(
        torch.func.vmap(torch.func.grad(objective))(batch),
        reference.expand(3, -1),
        rtol=1e-6,
        atol=1e-9,
    )


def test_nonnegative_least_squares_matches_closed_form_on_the_support():
    x, _, x_val, y_val = regression_data(n=30, p=8, seed=4)
    y = x @ torch.tensor([1.0, -1.0, 2.0, -0.5, 0.0, 1.5, -2.0, 0.3], dtype=F64)
    step = step_of(x)

    def f(w, h):
        return 0.5 * ((x @ w - h["y"]) ** 2).sum() / len(x)

    def mapping(w):
        return torch.relu(w - step * x.T @ (x @ w - y) / len(x))

    w = iterate(mapping, torch.zeros(8, dtype=F64), 5000)
    support = w > 0
    assert 0 < int(support.sum()) < 8
    condition = implicitfn.projected_gradient(f, implicitfn.projection_nonnegative(), step=step)
    assert condition.symmetric
    outer = validation_loss(x_val, y_val)
    adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.CG(rtol=1e-12, max_steps=100))
    gradient, _ = implicitfn.hypergradient(condition, outer, w, {"y": y}, adjoint=adjoint)
    variable = y.clone().requires_grad_()
    xs = x[:, support]
    ws = torch.linalg.solve(xs.T @ xs, xs.T @ variable)
    full = torch.zeros(8, dtype=F64).index_put((support.nonzero()[:, 0],), ws)
    (expected,) = torch.autograd.grad(outer(full, None), variable)
    torch.testing.assert_close(gradient["y"], expected, rtol=1e-8, atol=1e-10)


def box_qp(seed=0, size=6):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(size, size, generator=gen, dtype=F64)
    q = q @ q.T / size + torch.eye(size, dtype=F64)
    c = 3 * torch.randn(size, generator=gen, dtype=F64)
    return q, c


@pytest.mark.parametrize("bounds_in", ["hparams", "constants"])
def test_box_qp_matches_closed_form_on_the_free_set(bounds_in):
    q, c = box_qp()
    lower, upper = -torch.ones(6, dtype=F64), torch.ones(6, dtype=F64)
    step = 1 / float(torch.linalg.eigvalsh(q).max())
    w = iterate(
        lambda w: torch.clamp(w - step * (q @ w - c), -1, 1), torch.zeros(6, dtype=F64), 3000
    )
    free = (w > -1) & (w < 1)
    assert 0 < int(free.sum()) < 6

    def f(w, h):
        return 0.5 * w @ q @ w - h["c"] @ w

    if bounds_in == "hparams":
        projection, hparams = (
            implicitfn.projection_box("lower", "upper"),
            {"c": c, "lower": lower, "upper": upper},
        )
        solver = implicitfn.GMRES(rtol=1e-12, max_steps=100)
    else:
        projection, hparams = implicitfn.projection_box(-1.0, 1.0), {"c": c}
        solver = implicitfn.CG(rtol=1e-12, max_steps=100)  # restricted: symmetric
    condition = implicitfn.projected_gradient(f, projection, step=step)
    assert condition.symmetric == (bounds_in == "constants")

    def outer(w, h):
        return (w * torch.arange(1.0, 7.0, dtype=F64)).sum()

    adjoint = implicitfn.ImplicitAdjoint(solver=solver)
    gradient, _ = implicitfn.hypergradient(condition, outer, w, hparams, adjoint=adjoint)
    variables = {k: v.clone().requires_grad_() for k, v in hparams.items()}
    bounds = variables if bounds_in == "hparams" else {"lower": lower, "upper": upper}
    bound = torch.where(w > 0, bounds["upper"], bounds["lower"])
    fixed = torch.where(free, torch.zeros_like(bound), bound)
    rhs = variables["c"] - q @ fixed
    wf = torch.linalg.solve(q[free][:, free], rhs[free])
    solution = fixed.index_put((free.nonzero()[:, 0],), wf)
    expected = torch.autograd.grad(outer(solution, None), list(variables.values()))
    for key, value in zip(variables, expected, strict=True):
        torch.testing.assert_close(gradient[key], value, rtol=1e-8, atol=1e-10)


# -- finite differences on smooth pieces -------------------------------------------------------


def central_differences(objective, point, eps=1e-5):
    flat = point.reshape(-1)
    result = torch.empty_like(flat)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = eps
        result[i] = (
            objective((flat + e).view_as(point)) - objective((flat - e).view_as(point))
        ) / (2 * eps)
    return result.view_as(point)


def test_group_lasso_hypergradient_matches_finite_differences():
    x, y, x_val, y_val = regression_data(n=40, p=9, seed=6)
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    prox, step = implicitfn.prox_group_lasso(groups), step_of(x)
    outer = validation_loss(x_val, y_val)

    def solve(alpha):
        return iterate(
            lambda w: prox(w - step * x.T @ (x @ w - y) / len(y), step, alpha),
            torch.zeros(9, dtype=F64),
            3000,
        )

    alpha = torch.tensor([0.2, 0.9, 0.3], dtype=F64)
    w = solve(alpha)
    active = [bool(w[3 * g : 3 * g + 3].abs().sum() > 0) for g in range(3)]
    assert any(active) and not all(active)
    condition = implicitfn.proximal_gradient(least_squares, prox, step=step)
    adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.GMRES(rtol=1e-12, max_steps=100))
    gradient, _ = implicitfn.hypergradient(
        condition, outer, w, alpha, inner_args=(x, y), adjoint=adjoint
    )
    expected = central_differences(lambda a: outer(solve(a), None), alpha)
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "projection, hparams, shift",
    [
        ("simplex", torch.tensor(1.5, dtype=F64), torch.tensor([0.9, 0.6, -0.4, 0.2, -1.0])),
        ("ball", torch.tensor(0.8, dtype=F64), torch.tensor([0.9, 0.6, -0.4, 0.2, -1.0])),
    ],
)
def test_projected_hypergradient_matches_finite_differences(projection, hparams, shift):
    q, _ = box_qp(seed=7, size=5)
    target = shift.to(F64)
    make = {"simplex": implicitfn.projection_simplex, "ball": implicitfn.projection_l2_ball}
    proj = make[projection](None)  # the radius is the hyperparameter
    step = 1 / float(torch.linalg.eigvalsh(q).max())

    def f(w, r, target):
        return 0.5 * (w - target) @ q @ (w - target)

    def solve(r):
        return iterate(
            lambda w: proj.project(w - step * q @ (w - target), r), torch.zeros(5, dtype=F64), 4000
        )

    def outer(w, r):
        return (w * torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0], dtype=F64)).sum() + r**2

    w = solve(hparams)
    condition = implicitfn.projected_gradient(f, proj, step=step)
    adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.GMRES(rtol=1e-12, max_steps=100))
    gradient, _ = implicitfn.hypergradient(
        condition, outer, w, hparams, inner_args=(target,), adjoint=adjoint
    )
    expected = central_differences(lambda r: outer(solve(r), r), hparams)
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-8)


# -- every operator's Jacobian against a smooth reference away from kinks ------------------------


def jacobians(fn, *inputs):
    return torch.func.jacrev(fn, argnums=tuple(range(len(inputs))))(*inputs)


def assert_jacobians_match(op, reference, *inputs):
    actual, expected = jacobians(op, *inputs), jacobians(reference, *inputs)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL)
    forward = torch.func.jacfwd(op, argnums=tuple(range(len(inputs))))(*inputs)
    for a, e in zip(forward, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL)


@given(prox_points())
def test_l1_and_elastic_net_jacobians(point):
    z, strength, step = point
    assume(((z.abs() - step * strength).abs() > 1e-4).all())
    support = (z.abs() > step * strength).to(F64)
    signs = torch.sign(z)

    def reference(z, alpha, beta):
        return support * (z - step * alpha * signs) / (1 + step * beta)

    beta = strength.flip(0)
    prox = implicitfn.prox_elastic_net(l1="a", l2="b")
    assert_jacobians_match(
        lambda z, a, b: prox(z, step, {"a": a, "b": b}), reference, z, strength, beta
    )
    l1 = implicitfn.prox_l1()
    assert_jacobians_match(
        lambda z, a: l1(z, step, a), lambda z, a: reference(z, a, torch.zeros_like(a)), z, strength
    )


@given(prox_points(min_size=2))
def test_group_lasso_jacobian(point):
    z, strength, step = point
    ids = torch.arange(len(z)) % 2
    alpha = strength[:2]
    norms = torch.stack([z[ids == g].norm() for g in range(2)])
    assume(((norms - step * alpha).abs() > 1e-4).all())
    prox = implicitfn.prox_group_lasso(ids)

    def reference(z, alpha):
        out = torch.zeros_like(z)
        for g in range(2):
            if norms[g] > step * alpha[g]:
                zg = z[ids == g]
                out = out.index_put(
                    (torch.nonzero(ids == g)[:, 0],), zg * (1 - step * alpha[g] / zg.norm())
                )
        return out

    assert_jacobians_match(lambda z, a: prox(z, step, a), reference, z, alpha)


@given(prox_points())
def test_projection_jacobians(point):
    z, strength, _ = point
    lower, upper = -strength, strength.flip(0)
    assume(((z - lower).abs() > 1e-4).all() and ((z - upper).abs() > 1e-4).all())
    inside, low = ((z > lower) & (z < upper)).to(F64), (z <= lower).to(F64)
    high = 1 - inside - low
    box = implicitfn.projection_box("l", "u")
    assert_jacobians_match(
        lambda z, lo, hi: box.project(z, {"l": lo, "u": hi}),
        lambda z, lo, hi: inside * z + low * lo + high * hi,
        z,
        lower,
        upper,
    )
    positive = (z > 0).to(F64)
    assert_jacobians_match(
        lambda z: implicitfn.projection_nonnegative().project(z, None), lambda z: positive * z, z
    )
    radius = strength.sum() / 2
    simplex = implicitfn.projection_simplex(None)
    support = simplex.project(z, radius) > 0
    tau = (z[support].sum() - radius) / support.sum()
    assume((z[~support] < tau - 1e-4).all() and (z[support] > tau + 1e-4).all())
    s = support.to(F64)
    assert_jacobians_match(
        lambda z, r: simplex.project(z, r),
        lambda z, r: s * (z - ((s * z).sum() - r) / s.sum()),
        z,
        radius,
    )
    ball = implicitfn.projection_l2_ball(None)
    assume(abs(float(z.norm() - radius)) > 1e-4)
    outside = bool(z.norm() > radius)
    assert_jacobians_match(
        lambda z, r: ball.project(z, r),
        lambda z, r: r * z / z.norm() if outside else z + 0 * r,
        z,
        radius,
    )


def test_group_lasso_at_zero_has_finite_jacobian():
    prox = implicitfn.prox_group_lasso([0, 0, 1])
    jac = torch.func.jacrev(lambda z: prox(z, 1.0, torch.tensor(0.5, dtype=F64)))(
        torch.tensor([0.0, 0.0, 2.0], dtype=F64)
    )
    assert torch.isfinite(jac).all()


# -- projections are correct ------------------------------------------------------------------


@given(prox_points(), st.floats(0.1, 3.0))
def test_projections_feasible_idempotent_and_optimal(point, radius):
    z, strength, _ = point
    z = 3 * z
    cases = {
        "box": (
            implicitfn.projection_box(-0.5, 1.0),
            lambda w: (w >= -0.5).all() and (w <= 1.0).all(),
        ),
        "nonnegative": (implicitfn.projection_nonnegative(), lambda w: (w >= 0).all()),
        "simplex": (
            implicitfn.projection_simplex(radius),
            lambda w: (w >= 0).all() and abs(float(w.sum()) - radius) < 1e-9,
        ),
        "ball": (
            implicitfn.projection_l2_ball(radius),
            lambda w: float(w.norm()) <= radius + 1e-12,
        ),
    }
    gen = torch.Generator().manual_seed(len(z))
    for name, (projection, feasible) in cases.items():
        w = projection.project(z, None)
        assert feasible(w), name
        torch.testing.assert_close(projection.project(w, None), w, rtol=1e-12, atol=1e-12)
        # Optimality: <z - w, v - w> <= 0 for every feasible v (here projections of random points).
        for _ in range(5):
            v = projection.project(4 * torch.randn(len(z), generator=gen, dtype=F64), None)
            assert float((z - w) @ (v - w)) <= 1e-9, name


def test_projections_apply_along_the_last_dimension():
    z = torch.tensor([[0.8, 0.6, -1.0], [3.0, 4.0, 0.0]], dtype=F64)
    w = implicitfn.projection_simplex(1.0).project(z, None)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, dtype=F64))
    radii = torch.tensor([10.0, 1.0], dtype=F64)
    w = implicitfn.projection_l2_ball("r").project(z, {"r": radii})
    torch.testing.assert_close(w[0], z[0])
    torch.testing.assert_close(w[1].norm(), torch.tensor(1.0, dtype=F64))


# -- the restricted operator -------------------------------------------------------------------


@pytest.mark.parametrize("prox", ["l1", "elastic_net"])
def test_restricted_operator_is_identity_off_the_support_and_cheap_to_materialise(prox):
    x, y, _, _, l1, w = lasso_setup()
    hparams = {"l1": l1, "l2": torch.full_like(l1, 0.3)}
    if prox == "elastic_net":
        w = exact_elastic_net(x, y, l1, hparams["l2"])
        operator_prox = implicitfn.prox_elastic_net("l1", "l2")
    else:
        operator_prox = implicitfn.prox_l1("l1")
    condition = implicitfn.proximal_gradient(least_squares, operator_prox, step=step_of(x))
    full = implicitfn.proximal_gradient(
        least_squares, operator_prox, step=step_of(x), restrict=False
    )
    restricted = condition.linearize(implicitfn.Hessian(), w, hparams, x, y)
    matrix = restricted.as_matrix()
    support = w != 0
    basis = torch.eye(len(w), dtype=F64)
    by_products = torch.stack([restricted.mv(e) for e in basis], dim=1)
    torch.testing.assert_close(matrix, by_products, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(restricted.transpose().as_matrix(), matrix.T, rtol=1e-12, atol=1e-12)
    off = ~support
    torch.testing.assert_close(matrix[off][:, off], torch.eye(int(off.sum()), dtype=F64))
    assert torch.all(matrix[off][:, support] == 0) and torch.all(matrix[support][:, off] == 0)
    exact = full.linearize(implicitfn.Hessian(), w, hparams, x, y).as_matrix()
    torch.testing.assert_close(matrix[support][:, support], exact[support][:, support])
    if prox == "l1":
        assert condition.symmetric
        torch.testing.assert_close(matrix, matrix.T, rtol=1e-12, atol=1e-12)


# -- misuse raises before computing -------------------------------------------------------------


def never(*args):
    raise AssertionError("computed before the error")


@pytest.mark.parametrize(
    "build, error, match",
    [
        (
            lambda: implicitfn.proximal_gradient(3, implicitfn.prox_l1()),
            TypeError,
            "f: expected a callable",
        ),
        (
            lambda: implicitfn.proximal_gradient(never, implicitfn.prox_l1(), step=0.0),
            ValueError,
            "step: must be",
        ),
        (
            lambda: implicitfn.proximal_gradient(never, implicitfn.prox_l1(), step=True),
            TypeError,
            "step: expected",
        ),
        (lambda: implicitfn.proximal_gradient(never, "l1"), TypeError, "prox: expected a callable"),
        (
            lambda: implicitfn.proximal_gradient(never, never, restrict=True),
            ValueError,
            "restrict=True",
        ),
        (
            lambda: implicitfn.proximal_gradient(never, implicitfn.prox_l1(), restrict=1),
            TypeError,
            "restrict",
        ),
        (
            lambda: implicitfn.projected_gradient(never, implicitfn.prox_l1()),
            TypeError,
            "is a prox, not a projection",
        ),
        (lambda: implicitfn.projected_gradient(never, None), TypeError, "projection: expected"),
        (lambda: implicitfn.prox_l1([0.1, 0.2]), TypeError, "strength: expected a key"),
        (lambda: implicitfn.prox_l1(-1.0), ValueError, "strength: must be a finite number >= 0"),
        (lambda: implicitfn.prox_elastic_net(l2=float("nan")), ValueError, "l2: must be"),
        (lambda: implicitfn.prox_group_lasso([0.0, 1.0]), TypeError, "groups: expected"),
        (lambda: implicitfn.prox_group_lasso([0, -1]), ValueError, "groups: ids must be >= 0"),
        (lambda: implicitfn.projection_box(1.0, 0.0), ValueError, "lower <= upper"),
        (lambda: implicitfn.projection_simplex(0.0), ValueError, "radius: must be > 0"),
    ],
)
def test_misuse_raises_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_non_symmetric_condition_refuses_cg_before_the_inner_solve():
    condition = implicitfn.proximal_gradient(never, implicitfn.prox_elastic_net())
    with pytest.raises(ValueError, match="CG needs a symmetric operator"):
        implicitfn.implicit_diff(
            condition, adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG())
        )
    unrestricted = implicitfn.proximal_gradient(never, implicitfn.prox_l1(), restrict=False)
    with pytest.raises(ValueError, match="CG needs a symmetric operator"):
        implicitfn.implicit_diff(
            unrestricted, adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG())
        )


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: implicitfn.prox_l1("alpha")(torch.ones(3), 1.0, {"beta": torch.ones(3)}),
            KeyError,
            "no entry 'alpha'",
        ),
        (
            lambda: implicitfn.prox_l1()(torch.ones(3), 1.0, torch.ones(2)),
            ValueError,
            r"shape \(2,\) does not broadcast",
        ),
        (
            lambda: implicitfn.prox_l1()(torch.ones(3), 1.0, torch.ones(3, dtype=torch.int64)),
            TypeError,
            "floating-point",
        ),
        (
            lambda: implicitfn.prox_l1()({"w": torch.ones(3)}, 1.0, torch.ones(3)),
            TypeError,
            "for a dict of parameters",
        ),
        (
            lambda: implicitfn.prox_l1()(torch.ones(3), -1.0, torch.ones(3)),
            ValueError,
            "step must be",
        ),
        (
            lambda: implicitfn.prox_group_lasso([0, 1])(torch.ones(3), 1.0, torch.ones(2)),
            ValueError,
            "one group id per coordinate",
        ),
        (
            lambda: implicitfn.projection_simplex("r").project(
                torch.ones(2, 3), {"r": torch.ones(3)}
            ),
            ValueError,
            "the simplices",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
