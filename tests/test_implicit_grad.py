"""Reverse mode: .backward(), autograd.grad and torch.func.grad against references."""

import pytest
import torch
from helpers import assert_trees_close, assert_unchanged, clone_tree, ridge_data
from hypothesis import given
from hypothesis import strategies as st
from problems import logistic_data, logistic_loss, newton_minimise, ridge_inner
from tensordict import TensorDict

import implicitfn
from implicitfn.testing import finite_difference_gradient, ridge_hypergradient, ridge_solution


def validation_loss(w, x_val, y_val):
    return 0.5 * ((x_val @ w - y_val) ** 2).sum()


@given(
    n=st.integers(5, 30),
    d=st.integers(1, 8),
    seed=st.integers(0, 1000),
    log_penalty=st.floats(-3, 3),
    layout=st.sampled_from(["tensordict", "dict"]),
)
def test_ridge_dense_matches_closed_form(n, d, seed, log_penalty, layout):
    x, y, x_val, y_val = ridge_data(n, d, seed=seed)
    penalty = torch.full((d,), 10**log_penalty, dtype=torch.float64)
    penalty = penalty * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    leaf = penalty.clone().requires_grad_()
    hparams = TensorDict({"penalty": leaf}) if layout == "tensordict" else {"penalty": leaf}
    w = ridge_inner(implicitfn.Dense())(
        {"w": torch.zeros(d, dtype=torch.float64)}
        if layout == "dict"
        else TensorDict({"w": torch.zeros(d, dtype=torch.float64)}),
        hparams,
        x,
        y,
    )
    validation_loss(w["w"], x_val, y_val).backward()
    expected = ridge_hypergradient(penalty, x, y, x_val, y_val)
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-10, atol=1e-10)


@given(seed=st.integers(0, 1000), d=st.integers(2, 10))
def test_ridge_cg_matches_closed_form(seed, d):
    x, y, x_val, y_val = ridge_data(30, d, seed=seed)
    penalty = (
        torch.rand(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    )
    leaf = penalty.clone().requires_grad_()
    w = ridge_inner(implicitfn.CG(max_steps=100, rtol=1e-10))(
        TensorDict({"w": torch.zeros(d, dtype=torch.float64)}), TensorDict({"penalty": leaf}), x, y
    )
    (gradient,) = torch.autograd.grad(validation_loss(w["w"], x_val, y_val), leaf)
    expected = ridge_hypergradient(penalty, x, y, x_val, y_val)
    torch.testing.assert_close(gradient, expected, rtol=1e-6, atol=1e-8)


def test_torch_func_grad_and_one_call_function_agree():
    x, y, x_val, y_val = ridge_data(25, 4)
    penalty = torch.rand(4, dtype=torch.float64) + 0.5
    inner = ridge_inner(implicitfn.CG(rtol=1e-12))

    def outer(p):
        w = inner(
            TensorDict({"w": torch.zeros(4, dtype=torch.float64)}), TensorDict({"penalty": p}), x, y
        )
        return validation_loss(w["w"], x_val, y_val)

    expected = ridge_hypergradient(penalty, x, y, x_val, y_val)
    torch.testing.assert_close(torch.func.grad(outer)(penalty), expected)
    w_star = {"w": ridge_solution(penalty, x, y)}
    from implicitfn.testing import ridge_loss

    gradient, info = implicitfn.hypergradient(
        ridge_loss,
        lambda p, h, xv, yv: validation_loss(p["w"], xv, yv),
        w_star,
        {"penalty": penalty},
        inner_args=(x, y),
        outer_args=(x_val, y_val),
        adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG(rtol=1e-12)),
    )
    torch.testing.assert_close(gradient["penalty"], expected)
    assert bool(info.successful) and int(info.num_steps) <= 4


def test_direct_term_is_included_by_hypergradient():
    inner = lambda w, lam: 0.5 * ((w - 1.0) ** 2).sum() + 0.5 * lam * (w**2).sum()  # noqa: E731
    outer = lambda w, lam: (w**2).sum() + lam**2  # noqa: E731
    lam = torch.tensor(1.0, dtype=torch.float64)
    w_star = torch.full((3,), 0.5, dtype=torch.float64)
    gradient, _ = implicitfn.hypergradient(inner, outer, w_star, lam)
    # d/dlam [3 / (1 + lam)^2 + lam^2] at lam = 1
    torch.testing.assert_close(gradient, torch.tensor(-0.75 + 2.0, dtype=torch.float64))


@pytest.mark.parametrize(
    "solver", [implicitfn.Dense(), implicitfn.CG(rtol=1e-12)], ids=["Dense", "CG"]
)
@pytest.mark.parametrize(
    "curvature",
    [implicitfn.Hessian(), implicitfn.Hessian("forward-over-reverse")],
    ids=["rr", "fr"],
)
def test_logistic_regression_matches_dense_hessian_solve(solver, curvature):
    x, y = logistic_data()
    x_val, y_val = logistic_data(seed=1)
    hparams = TensorDict({"log_penalty": torch.linspace(-2, 0, 4, dtype=torch.float64)})
    params0 = TensorDict(
        {"w": torch.zeros(4, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    )

    @implicitfn.implicit_diff(
        implicitfn.stationarity(logistic_loss),
        adjoint=implicitfn.ImplicitAdjoint(solver=solver, curvature=curvature),
    )
    def inner(params, hparams, x, y):
        return newton_minimise(logistic_loss, params, hparams, x, y)

    def outer_loss(params):
        return torch.nn.functional.binary_cross_entropy_with_logits(
            x_val @ params["w"] + params["b"], y_val
        )

    leaf = hparams["log_penalty"].clone().requires_grad_()
    outer_loss(inner(params0, TensorDict({"log_penalty": leaf}), x, y)).backward()

    # Reference: dense IFT with explicit Hessian and mixed Jacobian.
    w_star = newton_minimise(logistic_loss, params0, hparams, x, y)
    flat_w, unravel = implicitfn.tree_ravel(w_star)
    loss_flat = lambda v, lp: logistic_loss(unravel(v), {"log_penalty": lp}, x, y)  # noqa: E731
    hessian = torch.func.hessian(loss_flat)(flat_w, hparams["log_penalty"])
    mixed = torch.func.jacrev(torch.func.grad(loss_flat), argnums=1)(flat_w, hparams["log_penalty"])
    outer_grad = implicitfn.tree_ravel(torch.func.grad(outer_loss)(w_star))[0]
    expected = -mixed.T @ torch.linalg.solve(hessian, outer_grad)
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-8, atol=1e-12)


def test_mlp_matches_central_finite_differences():
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    x_val, y_val = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, dtype=torch.float64)

    def train_loss(params, hparams, x, y):
        out = torch.tanh(x @ params["w1"]) @ params["w2"]
        decay = (
            0.5 * (hparams["w1"].exp() * params["w1"] ** 2).sum()
            + 0.5 * (hparams["w2"].exp() * params["w2"] ** 2).sum()
        )
        return 0.5 * ((out - y) ** 2).mean() + decay

    hparams = TensorDict(
        {
            "w1": torch.full((3, 4), -2.0, dtype=torch.float64),
            "w2": torch.full((4,), -2.0, dtype=torch.float64),
        }
    )
    start = TensorDict(
        {
            "w1": 0.5 * torch.randn(3, 4, dtype=torch.float64),
            "w2": 0.5 * torch.randn(4, dtype=torch.float64),
        }
    )
    # Start every solve at the optimum for the unperturbed hparams: Newton then needs few steps.
    params0 = newton_minimise(train_loss, start, hparams, x, y, steps=40)

    @implicitfn.implicit_diff(
        implicitfn.stationarity(train_loss),
        adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG(rtol=1e-12, max_steps=200)),
    )
    def inner(params, hparams, x, y):
        return newton_minimise(train_loss, params, hparams, x, y, steps=5)

    def validation(hparams):
        params = inner(params0, hparams, x, y)
        return 0.5 * ((torch.tanh(x_val @ params["w1"]) @ params["w2"] - y_val) ** 2).mean()

    gradient = torch.func.grad(validation)(hparams)
    with torch.no_grad():
        expected = finite_difference_gradient(validation, hparams, eps=1e-5)
    assert_trees_close(gradient, expected, rtol=1e-5, atol=1e-8)


def test_fixed_point_condition_matches_finite_differences():
    gen = torch.Generator().manual_seed(0)
    a = 0.4 * torch.randn(4, 4, generator=gen, dtype=torch.float64) / 2
    b = torch.randn(4, 2, generator=gen, dtype=torch.float64)

    def mapping(w, lam, a):
        return torch.tanh(a @ w + b @ lam)

    @implicitfn.implicit_diff(
        implicitfn.fixed_point(mapping),
        adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.FixedPoint(max_steps=500, rtol=1e-13)),
    )
    def inner(w, lam, a):
        for _ in range(300):
            w = mapping(w, lam, a)
        return w

    lam = torch.randn(2, dtype=torch.float64)

    def objective(lam, a):
        return (inner(torch.zeros(4, dtype=torch.float64), lam, a) ** 2).sum()

    grad_lam, grad_a = torch.func.grad(objective, argnums=(0, 1))(lam, a)
    with torch.no_grad():
        torch.testing.assert_close(
            grad_lam,
            finite_difference_gradient(lambda t: objective(t, a), lam),
            rtol=1e-6,
            atol=1e-9,
        )
        torch.testing.assert_close(
            grad_a, finite_difference_gradient(lambda t: objective(lam, t), a), rtol=1e-6, atol=1e-9
        )


def test_layouts_scalar_plain_tensor_and_nested():
    x, y, x_val, y_val = ridge_data(20, 3)

    def train_loss(w, lam, x, y):
        return 0.5 * ((x @ w - y) ** 2).sum() + 0.5 * lam * (w**2).sum()

    @implicitfn.implicit_diff(
        implicitfn.stationarity(train_loss),
        adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG(rtol=1e-12)),
    )
    def inner(w, lam, x, y):
        return ridge_solution(lam * torch.ones(3, dtype=torch.float64), x, y)

    lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    w = inner(torch.zeros(3, dtype=torch.float64), lam, x, y)
    assert isinstance(w, torch.Tensor)
    validation_loss(w, x_val, y_val).backward()
    expected = ridge_hypergradient(
        0.7 * torch.ones(3, dtype=torch.float64), x, y, x_val, y_val
    ).sum()
    torch.testing.assert_close(lam.grad, expected)

    nested = TensorDict({"model": {"w": torch.zeros(3, dtype=torch.float64)}})

    def nested_loss(params, hparams, x, y):
        return ridge_loss_nested(params, hparams, x, y)

    def ridge_loss_nested(params, hparams, x, y):
        w = params["model", "w"]
        return 0.5 * ((x @ w - y) ** 2).sum() + 0.5 * (hparams["decay"]["per_feature"] * w**2).sum()

    @implicitfn.implicit_diff(
        implicitfn.stationarity(nested_loss),
        adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.Dense()),
    )
    def nested_inner(params, hparams, x, y):
        return TensorDict({"model": {"w": ridge_solution(hparams["decay"]["per_feature"], x, y)}})

    penalty = torch.full((3,), 0.7, dtype=torch.float64, requires_grad=True)
    hparams = TensorDict({"decay": {"per_feature": penalty}})
    w = nested_inner(nested, hparams, x, y)
    validation_loss(w["model", "w"], x_val, y_val).backward()
    torch.testing.assert_close(
        penalty.grad, ridge_hypergradient(penalty.detach(), x, y, x_val, y_val)
    )


def test_gradients_reach_data_but_not_initial_params():
    x, y, x_val, y_val = ridge_data(20, 3)
    penalty = torch.ones(3, dtype=torch.float64)
    x_leaf = x.clone().requires_grad_()
    params0 = TensorDict({"w": torch.zeros(3, dtype=torch.float64, requires_grad=True)})
    before = clone_tree((params0, x))
    w = ridge_inner(implicitfn.CG(rtol=1e-12))(params0, TensorDict({"penalty": penalty}), x_leaf, y)
    validation_loss(w["w"], x_val, y_val).backward()
    expected = torch.func.grad(
        lambda xx: validation_loss(ridge_solution(penalty, xx, y), x_val, y_val)
    )(x)
    torch.testing.assert_close(x_leaf.grad, expected)
    assert params0["w"].grad is None
    assert_unchanged(before, (params0.detach(), x))


def test_gauss_newton_curvature_and_damping_options():
    x, y, x_val, y_val = ridge_data(20, 3)
    loss = implicitfn.CompositeLoss(
        predict=lambda p, h, x, y: x @ p["w"],
        output_loss=lambda out, h, x, y: 0.5 * ((out - y) ** 2).sum(),
        penalty=lambda p, h, x, y: 0.5 * (h["penalty"] * p["w"] ** 2).sum(),
    )
    penalty = torch.rand(3, dtype=torch.float64) + 0.5
    grads = {}
    for name, options in {
        "gn": {"curvature": implicitfn.GaussNewton()},
        "damped": {"damping": 1.0},
    }.items():

        @implicitfn.implicit_diff(
            implicitfn.stationarity(loss),
            adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG(rtol=1e-12), **options),
        )
        def inner(params, hparams, x, y):
            return {"w": ridge_solution(hparams["penalty"], x, y)}

        grads[name] = torch.func.grad(
            lambda p: validation_loss(
                inner({"w": torch.zeros(3, dtype=torch.float64)}, {"penalty": p}, x, y)["w"],
                x_val,
                y_val,
            )
        )(penalty)
    # Gauss-Newton is exact for a linear model; damping shifts the Hessian by the identity.
    torch.testing.assert_close(grads["gn"], ridge_hypergradient(penalty, x, y, x_val, y_val))
    w = ridge_solution(penalty, x, y)
    damped_adjoint = torch.linalg.solve(
        x.T @ x + torch.diag(penalty) + torch.eye(3, dtype=torch.float64),
        x_val.T @ (x_val @ w - y_val),
    )
    torch.testing.assert_close(grads["damped"], -w * damped_adjoint)


def test_callback_receives_the_solve_info():
    x, y, x_val, y_val = ridge_data(20, 3)
    infos = []
    inner = ridge_inner(implicitfn.CG(rtol=1e-10), callback=infos.append)
    penalty = torch.ones(3, dtype=torch.float64, requires_grad=True)
    validation_loss(
        inner(
            TensorDict({"w": torch.zeros(3, dtype=torch.float64)}),
            TensorDict({"penalty": penalty}),
            x,
            y,
        )["w"],
        x_val,
        y_val,
    ).backward()
    assert len(infos) == 1
    assert bool(infos[0].successful) and infos[0].solver == "CG"
    assert float(infos[0].relative_residual) <= 1e-10
