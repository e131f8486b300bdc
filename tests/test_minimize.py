"""implicitfn.minimize: the inner solve in one call, against closed forms and dense oracles."""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
import torchopt
from helpers import assert_trees_close, assert_unchanged, clone_tree, ridge_data
from hypothesis import given
from problems import logistic_data, logistic_loss
from strategies import build_tree, spd_matrix, tree_structures
from tensordict import TensorDict

import implicitfn
from implicitfn.testing import ridge_hypergradient, ridge_loss, ridge_solution

F64 = torch.float64

# Every optimizer choice, with a step size that converges on `well_conditioned_ridge`.
OPTIMIZERS = [
    pytest.param({"optimizer": "lbfgs"}, id="lbfgs"),
    pytest.param({"optimizer": "adam", "learning_rate": 0.05}, id="adam"),
    pytest.param({"optimizer": "sgd", "learning_rate": 0.5}, id="sgd"),
    pytest.param({"optimizer": "rmsprop", "learning_rate": 0.01}, id="rmsprop"),
    pytest.param({"optimizer": "adagrad", "learning_rate": 0.5}, id="adagrad"),
    pytest.param({"optimizer": torchopt.sgd(0.2, momentum=0.5)}, id="torchopt-sgd-momentum"),
]


def well_conditioned_ridge(n=30, d=4, seed=0):
    """Ridge data with X^T X close to the identity (so H = X^T X + diag(penalty) is too)."""
    x, y, x_val, y_val = ridge_data(n, d, seed=seed)
    return x / n**0.5, y / n**0.5, x_val, y_val


def tight():
    """An adjoint whose backward solve is exact to float64 rounding on these small problems
    (the default CG stops at a relative residual of 1e-5)."""
    return implicitfn.ImplicitAdjoint(solver=implicitfn.CG(max_steps=100, rtol=1e-12))


def val_loss(params, x_val, y_val):
    return 0.5 * ((x_val @ params["w"] - y_val) ** 2).sum()


def minimize_ridge(x, y, penalty=None, loss=ridge_loss, **options):
    """`implicitfn.minimize` of the ridge problem on `x, y` from w = 0, at `penalty` (default:
    ones), the start and penalty in the dtype and on the device of `x`."""
    like = {"dtype": x.dtype, "device": x.device}
    penalty = torch.ones(x.shape[1], **like) if penalty is None else penalty
    start = {"w": torch.zeros(x.shape[1], **like)}
    return implicitfn.minimize(loss, start, {"penalty": penalty}, x, y, **options)


def hypergradient_through_minimize(penalty, x, y, x_val, y_val, **options):
    options.setdefault("adjoint", tight())
    penalty = penalty.clone().requires_grad_()
    w = minimize_ridge(x, y, penalty, **options)
    val_loss(w, x_val, y_val).backward()
    return w, penalty.grad


def dense_ift_hypergradient(train, outer, params, hparams, args, outer_args):
    """dL_V/dλ = ∂L_V/∂λ - Bᵀ H⁻¹ ∂L_V/∂w with dense float64 matrices (H and B by torch.func)."""
    w, unravel_w = implicitfn.tree_ravel(params)
    h, unravel_h = implicitfn.tree_ravel(hparams)

    def train_flat(w_, h_):
        return train(unravel_w(w_), unravel_h(h_), *args)

    def outer_flat(w_, h_):
        return outer(unravel_w(w_), unravel_h(h_), *outer_args)

    hessian = torch.func.hessian(train_flat)(w, h)
    mixed = torch.func.jacrev(torch.func.grad(train_flat), argnums=1)(w, h)  # ∂²L/∂w∂λ
    outer_w, outer_h = torch.func.grad(outer_flat, argnums=(0, 1))(w, h)
    return unravel_h(outer_h - mixed.T @ torch.linalg.solve(hessian, outer_w))


def loss_evaluations(loss):
    """`loss` that counts its calls (outside the backward pass's torch.func evaluations)."""
    calls = []

    def counted(params, hparams, *args):
        calls.append(1)
        return loss(params, hparams, *args)

    return counted, calls


# -- answers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTIMIZERS)
def test_every_optimizer_reaches_the_tolerance_and_the_closed_form(options):
    x, y, x_val, y_val = well_conditioned_ridge()
    penalty = torch.linspace(0.5, 2.0, 4, dtype=F64)
    w, grad = hypergradient_through_minimize(
        penalty, x, y, x_val, y_val, **options, tol=1e-8, max_steps=3000, on_failure="raise"
    )
    gradient_norm = torch.linalg.vector_norm(
        torch.func.grad(ridge_loss)({"w": w["w"].detach()}, {"penalty": penalty}, x, y)["w"]
    )
    assert gradient_norm <= 1e-8
    torch.testing.assert_close(w["w"].detach(), ridge_solution(penalty, x, y), rtol=0, atol=1e-7)
    expected = ridge_hypergradient(penalty, x, y, x_val, y_val)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)


def test_ridge_hypergradient_matches_the_closed_form_at_default_settings():
    x, y, x_val, y_val = ridge_data(40, 5)  # a sum loss: gradients of order 10-100 at the start
    penalty = torch.logspace(-1, 1, 5, dtype=F64)
    _, grad = hypergradient_through_minimize(penalty, x, y, x_val, y_val, adjoint=None)
    expected = ridge_hypergradient(penalty, x, y, x_val, y_val)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_logistic_regression_matches_the_dense_oracle():
    x, y = logistic_data(60, 4, seed=1)
    x_val, y_val = logistic_data(40, 4, seed=2)
    log_penalty = torch.tensor([-2.0, -1.0, 0.0, 1.0], dtype=F64, requires_grad=True)
    hparams = TensorDict(log_penalty=log_penalty)
    start = TensorDict(w=torch.zeros(4, dtype=F64), b=torch.zeros((), dtype=F64))

    def outer(params, hparams, x, y):
        return F.binary_cross_entropy_with_logits(x @ params["w"] + params["b"], y)

    w = implicitfn.minimize(
        logistic_loss, start, hparams, x, y, tol=1e-10, on_failure="raise", adjoint=tight()
    )
    outer(w, hparams, x_val, y_val).backward()
    expected = dense_ift_hypergradient(
        logistic_loss, outer, w.detach(), hparams.detach(), (x, y), (x_val, y_val)
    )
    torch.testing.assert_close(log_penalty.grad, expected["log_penalty"], rtol=1e-7, atol=1e-10)


def test_float32_logistic_regression_is_quiet_and_close_to_the_float64_oracle():
    """float32 cannot resolve the loss changes L-BFGS needs much below |grad| ~ 1e-6: that stop
    counts as converged (no warning), and the hypergradient is still float32-accurate."""
    x, y = logistic_data(200, 10, seed=3, dtype=torch.float32)
    log_penalty = torch.full((10,), -3.0, requires_grad=True)
    hparams = {"log_penalty": log_penalty}
    start = {"w": torch.zeros(10), "b": torch.zeros(())}

    def outer(params, hparams, x, y):
        return F.binary_cross_entropy_with_logits(x @ params["w"] + params["b"], y)

    w = implicitfn.minimize(logistic_loss, start, hparams, x, y, tol=1e-9, on_failure="raise")
    assert w["w"].dtype == torch.float32
    outer(w, hparams, x, y).backward()
    as64 = lambda tree: pytree.tree_map(lambda t: t.detach().double(), tree)  # noqa: E731
    expected = dense_ift_hypergradient(
        logistic_loss,
        outer,
        as64(w),
        as64(hparams),
        (x.double(), y.double()),
        (x.double(), y.double()),
    )
    torch.testing.assert_close(
        log_penalty.grad.double(), expected["log_penalty"], rtol=1e-3, atol=1e-6
    )


def test_hypergradients_reach_tensor_args_too():
    x, y, x_val, y_val = well_conditioned_ridge(seed=4)
    penalty = torch.ones(4, dtype=F64)
    y = y.clone().requires_grad_()
    w = minimize_ridge(x, y, penalty, tol=1e-10, adjoint=tight())
    val_loss(w, x_val, y_val).backward()

    def outer_of_y(labels):
        return val_loss({"w": ridge_solution(penalty, x, labels)}, x_val, y_val)

    torch.testing.assert_close(
        y.grad, torch.func.grad(outer_of_y)(y.detach()), rtol=1e-6, atol=1e-9
    )


def test_torch_func_grad_and_jvp_through_minimize():
    x, y, x_val, y_val = well_conditioned_ridge(seed=5)
    penalty = torch.linspace(0.5, 1.5, 4, dtype=F64)

    def outer(p):
        return val_loss(minimize_ridge(x, y, p, tol=1e-10, adjoint=tight()), x_val, y_val)

    expected = ridge_hypergradient(penalty, x, y, x_val, y_val)
    torch.testing.assert_close(torch.func.grad(outer)(penalty), expected, rtol=1e-6, atol=1e-9)
    direction = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=F64)
    _, tangent = torch.func.jvp(outer, (penalty,), (direction,))
    torch.testing.assert_close(tangent, expected @ direction, rtol=1e-6, atol=1e-9)
    with pytest.raises(RuntimeError, match=r"minimize: cannot run under torch\.func\.vmap"):
        torch.func.vmap(outer)(penalty.expand(2, 4))


def test_under_no_grad_the_loop_still_runs():
    x, y, _, _ = well_conditioned_ridge(seed=6)
    penalty = torch.ones(4, dtype=F64)
    with torch.no_grad():
        w = minimize_ridge(x, y, penalty)
    torch.testing.assert_close(w["w"], ridge_solution(penalty, x, y), rtol=0, atol=1e-7)


def test_the_adjoint_is_the_one_given():
    x, y, x_val, y_val = well_conditioned_ridge(seed=7)
    infos = []
    adjoint = implicitfn.ImplicitAdjoint(
        solver=implicitfn.MINRES(max_steps=50, rtol=1e-12), callback=infos.append
    )
    penalty = torch.ones(4, dtype=F64)
    _, grad = hypergradient_through_minimize(
        penalty, x, y, x_val, y_val, adjoint=adjoint, tol=1e-10
    )
    assert [info.solver for info in infos] == ["MINRES"]
    torch.testing.assert_close(
        grad, ridge_hypergradient(penalty, x, y, x_val, y_val), rtol=1e-6, atol=1e-9
    )


def test_a_warm_start_at_the_optimum_costs_one_evaluation():
    x, y, _, _ = well_conditioned_ridge(seed=8)
    penalty = torch.ones(4, dtype=F64)
    loss, calls = loss_evaluations(ridge_loss)
    start = {"w": ridge_solution(penalty, x, y)}
    with torch.no_grad():
        implicitfn.minimize(loss, start, {"penalty": penalty}, x, y)
    assert len(calls) == 1


# -- purity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTIMIZERS)
def test_the_callers_tensors_are_unchanged_and_not_aliased(options):
    x, y, x_val, y_val = well_conditioned_ridge(seed=9)
    start = TensorDict(w=torch.randn(4, dtype=F64, requires_grad=True))
    hparams = TensorDict(penalty=torch.ones(4, dtype=F64, requires_grad=True))
    before = clone_tree((start.detach(), hparams.detach(), x, y))
    approximate = implicitfn.ImplicitAdjoint(inner_rtol=None)  # 50 steps: not at the optimum
    w = implicitfn.minimize(
        ridge_loss, start, hparams, x, y, **options, max_steps=50, tol=0.0, adjoint=approximate
    )
    val_loss(w, x_val, y_val).backward()
    assert_unchanged(before, (start.detach(), hparams.detach(), x, y))
    assert start["w"].grad is None  # no gradient reaches the start
    assert hparams["penalty"].grad is not None
    caller = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((start, hparams, x, y))}
    assert w["w"].untyped_storage().data_ptr() not in caller
    with torch.no_grad():
        w["w"].add_(1.0)  # writing into the result leaves the caller's tensors alone
    assert_unchanged(before, (start.detach(), hparams.detach(), x, y))


# -- structures ---------------------------------------------------------------------------------


def _split_loss(params, hparams, x, y):
    """Ridge with w split into two leaves, whatever the container."""
    if isinstance(params, torch.Tensor):
        w = params
    elif isinstance(params, (tuple, list)):
        w = torch.cat([params[0], params[1]["tail"] if isinstance(params[1], dict) else params[1]])
    else:
        w = torch.cat([params["head"], params["rest"]["tail"]])
    return ridge_loss({"w": w}, hparams, x, y)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda h, t: torch.cat([h, t]), id="tensor"),
        pytest.param(lambda h, t: {"head": h, "rest": {"tail": t}}, id="nested-dict"),
        pytest.param(lambda h, t: TensorDict(head=h, rest=TensorDict(tail=t)), id="tensordict"),
        pytest.param(lambda h, t: (h, t), id="tuple"),
        pytest.param(lambda h, t: [h, {"tail": t}], id="list"),
    ],
)
def test_pytrees_round_trip(make):
    x, y, x_val, y_val = well_conditioned_ridge(seed=10)
    penalty = torch.linspace(0.5, 2.0, 4, dtype=F64, requires_grad=True)
    start = make(torch.zeros(1, dtype=F64), torch.zeros(3, dtype=F64))
    w = implicitfn.minimize(
        _split_loss, start, {"penalty": penalty}, x, y, tol=1e-10, adjoint=tight()
    )
    assert type(w) is type(start)
    assert pytree.tree_structure(w) == pytree.tree_structure(start)
    flat = torch.cat([leaf.reshape(-1) for leaf in pytree.tree_leaves(w)])
    torch.testing.assert_close(
        flat.detach(), ridge_solution(penalty.detach(), x, y), rtol=0, atol=1e-7
    )
    val_loss({"w": flat}, x_val, y_val).backward()
    expected = ridge_hypergradient(penalty.detach(), x, y, x_val, y_val)
    torch.testing.assert_close(penalty.grad, expected, rtol=1e-6, atol=1e-9)


@given(tree_structures(), st.floats(-2.0, 2.0), st.integers(0, 2**16))
def test_random_structures_round_trip_with_the_closed_form(structure, log_scale, seed):
    """L = ½ Σ e^a (p - t)² + ½ Σ p²  →  p* = e^a t / (e^a + 1), dΣp*/da = Σ t e^a / (e^a + 1)²."""
    gen = torch.Generator().manual_seed(seed)
    target = build_tree(
        structure, lambda shape, dtype: torch.randn(shape, generator=gen, dtype=dtype)
    )
    start = build_tree(structure, lambda shape, dtype: torch.zeros(shape, dtype=dtype))

    def loss(params, a, target):
        pairs = zip(pytree.tree_leaves(params), pytree.tree_leaves(target), strict=True)
        return sum(0.5 * (a.exp() * (p - t) ** 2 + p**2).sum() for p, t in pairs)

    a = torch.tensor(log_scale, dtype=F64, requires_grad=True)
    w = implicitfn.minimize(loss, start, a, target, tol=1e-10, on_failure="raise", adjoint=tight())
    assert pytree.tree_structure(w) == pytree.tree_structure(start)
    scale = torch.tensor(log_scale, dtype=F64).exp()
    assert_trees_close(
        pytree.tree_map(torch.detach, w),
        pytree.tree_map(lambda t: scale * t / (scale + 1), target),
        rtol=1e-8,
        atol=1e-10,
    )
    sum(leaf.sum() for leaf in pytree.tree_leaves(w)).backward()
    expected = sum(t.sum() for t in pytree.tree_leaves(target)) * scale / (scale + 1) ** 2
    torch.testing.assert_close(a.grad, expected, rtol=1e-7, atol=1e-10)


# -- the property --------------------------------------------------------------------------------


@given(
    st.integers(1, 5),
    st.floats(1.0, 1e3),
    st.integers(0, 2**16),
    st.sampled_from([0.0, 1e-2, 1.0]),
)
def test_hypergradient_matches_the_closed_form_on_random_ridge_problems(
    d, condition, seed, min_penalty
):
    """Random well-conditioned ridge problems: XᵀX has eigenvalues log-spaced in [1, condition]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.linalg.cholesky(spd_matrix(d, condition, seed)).T  # XᵀX = the SPD matrix
    x = torch.cat([x, torch.zeros(2, d, dtype=F64)])  # more rows than columns
    y = torch.randn(d + 2, generator=gen, dtype=F64)
    x_val = torch.randn(6, d, generator=gen, dtype=F64)
    y_val = torch.randn(6, generator=gen, dtype=F64)
    penalty = min_penalty + torch.rand(d, generator=gen, dtype=F64)
    _, grad = hypergradient_through_minimize(
        penalty, x, y, x_val, y_val, tol=1e-10, max_steps=1000, on_failure="raise"
    )
    expected = ridge_hypergradient(penalty, x, y, x_val, y_val)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)


# -- failures --------------------------------------------------------------------------------------


def test_not_reaching_the_tolerance_warns_at_the_callers_line():
    x, y, x_val, y_val = ridge_data(40, 5)
    penalty = torch.ones(5, dtype=F64, requires_grad=True)
    with pytest.warns(implicitfn.MinimizeWarning) as record:
        w = implicitfn.minimize(
            ridge_loss, {"w": torch.zeros(5, dtype=F64)}, {"penalty": penalty}, x, y, max_steps=2
        )
    assert len(record) == 1 and record[0].filename == __file__
    message = str(record[0].message)
    assert "gradient norm" in message and "above tol=1e-06" in message
    assert "after max_steps=2 steps of L-BFGS" in message
    assert "implicit function theorem" in message and "raise max_steps" in message
    val_loss(w, x_val, y_val).backward()  # the approximate hypergradient is still returned
    assert penalty.grad is not None


def test_not_reaching_the_tolerance_raises_on_request():
    x, y, _, _ = ridge_data(40, 5)
    with pytest.raises(implicitfn.MinimizeError, match="after max_steps=3 steps of adam") as caught:
        minimize_ridge(x, y, optimizer="adam", learning_rate=0.01, max_steps=3, on_failure="raise")
    assert caught.value.step == 3 and caught.value.grad_norm > 1e-6
    assert caught.value.loss > 0


@pytest.mark.parametrize(
    "options", [{"optimizer": "lbfgs"}, {"optimizer": "sgd", "learning_rate": 0.01}]
)
def test_tol_zero_runs_the_budget_without_a_warning(options):
    x, y, _, _ = ridge_data(40, 5)
    loss, calls = loss_evaluations(ridge_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minimize_ridge(x, y, loss=loss, **options, max_steps=4, tol=0.0)
    if options["optimizer"] == "sgd":
        assert len(calls) == 5  # 4 steps, and the gradient at the point returned
    else:
        assert len(calls) >= 5


def test_a_noisy_loss_stalls_lbfgs_with_a_warning_that_says_so():
    x, y = logistic_data(100, 5, seed=11)

    def dropout_loss(params, hparams, x, y):
        return logistic_loss(params, hparams, F.dropout(x, 0.2), y)

    start = {"w": torch.zeros(5, dtype=F64), "b": torch.zeros((), dtype=F64)}
    with pytest.warns(implicitfn.MinimizeWarning, match="noisy"):
        implicitfn.minimize(dropout_loss, start, {"log_penalty": torch.zeros(5, dtype=F64)}, x, y)


def test_a_diverging_inner_solve_raises_naming_the_step():
    x, y, _, _ = ridge_data(40, 5)
    with pytest.raises(
        implicitfn.MinimizeError,
        match=r"(loss is (inf|nan)|gradient of the loss contains NaN/Inf) at step [1-9]\d*.*diverged",
    ) as caught:
        minimize_ridge(x, y, optimizer="sgd", learning_rate=10.0)
    assert caught.value.step > 0


def test_a_nan_loss_at_the_start_raises_naming_step_zero():
    def bad(params, hparams):
        return torch.log(params - 1.0).sum()  # log of a negative number at the start

    with pytest.raises(
        implicitfn.MinimizeError, match="the loss is nan at step 0; at the starting point"
    ):
        implicitfn.minimize(bad, torch.zeros(2, dtype=F64), torch.ones(1, dtype=F64))
    with pytest.raises(
        implicitfn.MinimizeError, match="gradient of the loss contains NaN/Inf at step 0"
    ):
        implicitfn.minimize(
            lambda p, h: p.abs().sqrt().sum(), torch.zeros(2, dtype=F64), torch.ones(1, dtype=F64)
        )


def test_progress_bar(capsys):
    x, y, _, _ = well_conditioned_ridge(seed=12)
    minimize_ridge(x, y, progress=True)
    err = capsys.readouterr().err
    assert "minimize (L-BFGS)" in err and "grad_norm=" in err and "loss=" in err


# -- misuse is refused before computing ------------------------------------------------------------

BAD_OPTIONS = [
    ({"optimizer": "newton"}, ValueError, "optimizer: unknown name 'newton'; use one of 'lbfgs'"),
    ({"optimizer": torch.optim.Adam}, TypeError, "optimizer: expected one of 'lbfgs'.*got type"),
    ({"optimizer": "adam"}, ValueError, "learning_rate: required with optimizer='adam'"),
    (
        {"optimizer": torchopt.adam(0.1), "learning_rate": 0.1},
        ValueError,
        "learning_rate: a torchopt.GradientTransformation carries",
    ),
    ({"learning_rate": -1.0}, ValueError, "learning_rate: must be a finite float > 0"),
    ({"learning_rate": True}, TypeError, "learning_rate: expected a float"),
    ({"max_steps": 0}, ValueError, "max_steps: must be >= 1"),
    ({"max_steps": 10.0}, TypeError, "max_steps: expected a positive int"),
    ({"tol": -1e-6}, ValueError, "tol: must be a finite float >= 0"),
    ({"tol": float("nan")}, ValueError, "tol: must be a finite float >= 0"),
    ({"tol": "1e-6"}, TypeError, "tol: expected a float"),
    ({"on_failure": "ignore"}, ValueError, "on_failure: expected 'warn' or 'raise'"),
    ({"adjoint": implicitfn.CG()}, TypeError, "adjoint: expected implicitfn.ImplicitAdjoint"),
    ({"progress": 1}, TypeError, "progress: expected a bool"),
]


@pytest.mark.parametrize("options, error, match", BAD_OPTIONS)
def test_bad_options_raise_before_any_evaluation(options, error, match):
    x, y, _, _ = well_conditioned_ridge()
    loss, calls = loss_evaluations(ridge_loss)
    with pytest.raises(error, match=match):
        minimize_ridge(x, y, loss=loss, **options)
    assert not calls


@pytest.mark.parametrize(
    "params, hparams, error, match",
    [
        (
            {"w": torch.zeros(4, dtype=torch.int64)},
            {"penalty": torch.ones(4, dtype=F64)},
            TypeError,
            r"params\['w'\]: must be floating point",
        ),
        ({"w": torch.zeros(4, dtype=F64)}, 0.1, TypeError, "hparams: a Python float"),
        ("w", {"penalty": torch.ones(4, dtype=F64)}, TypeError, "params: expected"),
    ],
)
def test_bad_trees_raise_before_any_evaluation(params, hparams, error, match):
    x, y, _, _ = well_conditioned_ridge()
    loss, calls = loss_evaluations(ridge_loss)
    with pytest.raises(error, match=match):
        implicitfn.minimize(loss, params, hparams, x, y)
    assert not calls


def test_bad_losses_are_named():
    params, hparams = {"w": torch.zeros(3, dtype=F64)}, {"penalty": torch.ones(3, dtype=F64)}
    with pytest.raises(TypeError, match="loss: expected a callable"):
        implicitfn.minimize("ridge", params, hparams)
    with pytest.raises(ValueError, match=r"loss: must return a scalar tensor, got \(3,\)"):
        implicitfn.minimize(lambda p, h: p["w"] ** 2, params, hparams)
    outside = torch.ones(
        3, dtype=F64, requires_grad=True
    )  # e.g. net(x) with the module's own weights
    with pytest.raises(ValueError, match=r"loss: does not depend on params.*not net\(x\)"):
        implicitfn.minimize(lambda p, h: (outside**2).sum(), params, hparams)
    with pytest.raises(TypeError, match="loss: must return a floating-point tensor"):
        implicitfn.minimize(lambda p, h: (p["w"] > 0).sum(), params, hparams)


def test_nan_in_the_data_is_named_before_any_evaluation():
    x, y, _, _ = well_conditioned_ridge()
    x = x.clone()
    x[0, 0] = float("nan")
    loss, calls = loss_evaluations(ridge_loss)
    with pytest.raises(ValueError, match=r"args\[0\]: contains NaN"):
        minimize_ridge(x, y, loss=loss)
    assert not calls


# -- devices and dtypes ------------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "optimizer", [{"optimizer": "lbfgs"}, {"optimizer": "adam", "learning_rate": 0.05}]
)
def test_device_and_dtype_are_kept(device, dtype, optimizer):
    x, y, x_val, y_val = (t.to(device, dtype) for t in well_conditioned_ridge(seed=13))
    penalty = torch.ones(4, dtype=dtype, device=device, requires_grad=True)
    tol = 1e-6 if dtype == F64 else 1e-4
    w = minimize_ridge(x, y, penalty, **optimizer, tol=tol, max_steps=3000)
    assert w["w"].dtype == dtype and w["w"].device.type == device
    val_loss(w, x_val, y_val).backward()
    assert penalty.grad.dtype == dtype and penalty.grad.device.type == device
    expected = ridge_hypergradient(
        *(t.detach().cpu().double() for t in (penalty, x, y, x_val, y_val))
    )
    rtol = 1e-5 if dtype == F64 else 1e-3
    torch.testing.assert_close(penalty.grad.cpu().double(), expected, rtol=rtol, atol=rtol)
