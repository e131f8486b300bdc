"""unrolled_hypergradient: closed forms on ridge, its link to Neumann, and its input checks."""

import pytest
import torch
from helpers import assert_trees_close, assert_unchanged, clone_tree, ridge_data, td

import implicitfn
from implicitfn.testing import ridge_hypergradient, ridge_loss, ridge_solution


def validation_loss(params, hparams, x_val, y_val):
    return 0.5 * ((x_val @ params["w"] - y_val) ** 2).sum()


@pytest.fixture
def ridge():
    x, y, x_val, y_val = ridge_data(n=30, d=4)
    penalty = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    hessian = x.T @ x + torch.diag(penalty)
    learning_rate = 1.0 / float(torch.linalg.eigvalsh(hessian)[-1])
    return x, y, x_val, y_val, penalty, learning_rate


def unrolled(ridge, start, steps, momentum=0.0):
    x, y, x_val, y_val, penalty, learning_rate = ridge
    return implicitfn.unrolled_hypergradient(
        ridge_loss,
        validation_loss,
        td(w=start),
        td(penalty=penalty),
        steps=steps,
        learning_rate=learning_rate,
        momentum=momentum,
        inner_args=(x, y),
        outer_args=(x_val, y_val),
    )


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_matches_the_closed_form_of_k_descent_steps(ridge, steps):
    # Gradient descent on a quadratic: w_k = w* + (I - eta H)^k (w_0 - w*), differentiated as
    # an explicit function of the penalty (an independent route to the same derivative).
    x, y, x_val, y_val, penalty, learning_rate = ridge
    start = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)

    def closed_form_objective(lam):
        w_star = ridge_solution(lam, x, y)
        contraction = torch.eye(4, dtype=lam.dtype) - learning_rate * (x.T @ x + torch.diag(lam))
        w_k = w_star + torch.linalg.matrix_power(contraction, steps) @ (start - w_star)
        return validation_loss({"w": w_k}, None, x_val, y_val)

    expected = torch.func.grad(closed_form_objective)(penalty)
    hypergrad, final = unrolled(ridge, start, steps)
    torch.testing.assert_close(hypergrad["penalty"], expected, rtol=1e-10, atol=1e-12)
    assert final["w"].shape == (4,) and not final["w"].requires_grad


def test_momentum_matches_a_plain_autograd_loop(ridge):
    x, y, x_val, y_val, penalty, learning_rate = ridge
    lam = penalty.clone().requires_grad_()
    w_k = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    velocity = torch.zeros(4, dtype=torch.float64)
    for _ in range(7):  # torch.optim.SGD's heavy ball, written out with create_graph=True
        (gradient,) = torch.autograd.grad(
            ridge_loss({"w": w_k}, {"penalty": lam}, x, y), w_k, create_graph=True
        )
        velocity = 0.9 * velocity + gradient
        w_k = w_k - learning_rate * velocity
    (expected,) = torch.autograd.grad(validation_loss({"w": w_k}, None, x_val, y_val), lam)
    hypergrad, final = unrolled(ridge, torch.zeros(4, dtype=torch.float64), 7, momentum=0.9)
    torch.testing.assert_close(hypergrad["penalty"], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(final["w"], w_k.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_many_steps_from_the_solution_give_the_implicit_hypergradient(ridge, momentum):
    x, y, x_val, y_val, penalty, _ = ridge
    hypergrad, final = unrolled(ridge, ridge_solution(penalty, x, y), 400, momentum)
    expected = ridge_hypergradient(penalty, x, y, x_val, y_val)
    torch.testing.assert_close(hypergrad["penalty"], expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(final["w"], ridge_solution(penalty, x, y), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [2, 8])
def test_from_the_solution_it_equals_neumann_with_as_many_terms(ridge, steps):
    x, y, x_val, y_val, penalty, learning_rate = ridge
    w_star = td(w=ridge_solution(penalty, x, y))
    hypergrad, _ = unrolled(ridge, w_star["w"], steps)
    neumann, _ = implicitfn.hypergradient(
        ridge_loss,
        validation_loss,
        w_star,
        td(penalty=penalty),
        inner_args=(x, y),
        outer_args=(x_val, y_val),
        adjoint=implicitfn.ImplicitAdjoint(
            solver=implicitfn.Neumann(max_steps=steps, alpha=learning_rate)
        ),
    )
    assert_trees_close(hypergrad, neumann)


def test_inputs_are_not_modified_and_dict_trees_work(ridge):
    x, y, x_val, y_val, penalty, learning_rate = ridge
    params = {"w": torch.ones(4, dtype=torch.float64)}
    hparams = {"penalty": penalty.clone().requires_grad_()}
    before = clone_tree((params, hparams))
    hypergrad, _ = implicitfn.unrolled_hypergradient(
        ridge_loss,
        validation_loss,
        params,
        hparams,
        steps=3,
        learning_rate=learning_rate,
        inner_args=(x, y),
        outer_args=(x_val, y_val),
    )
    assert isinstance(hypergrad, dict) and hypergrad["penalty"].shape == (4,)
    assert_unchanged(before, (params, hparams))
    assert hparams["penalty"].grad is None


def test_runs_under_vmap_over_hyperparameters(ridge):
    x, y, x_val, y_val, penalty, learning_rate = ridge
    start = td(w=torch.zeros(4, dtype=torch.float64))
    batch = torch.stack([penalty, 2 * penalty])

    def one(lam):
        return implicitfn.unrolled_hypergradient(
            ridge_loss,
            validation_loss,
            start,
            {"penalty": lam},
            steps=4,
            learning_rate=learning_rate / 2,
            inner_args=(x, y),
            outer_args=(x_val, y_val),
        )[0]["penalty"]

    batched = torch.func.vmap(one)(batch)
    torch.testing.assert_close(batched, torch.stack([one(lam) for lam in batch]))


def test_divergence_is_reported(ridge):
    x, y, x_val, y_val, penalty, learning_rate = ridge
    with pytest.raises(FloatingPointError, match="learning_rate below 2"):
        implicitfn.unrolled_hypergradient(
            ridge_loss,
            validation_loss,
            td(w=torch.ones(4, dtype=torch.float64)),
            td(penalty=penalty),
            steps=400,
            learning_rate=10 * learning_rate,
            inner_args=(x, y),
            outer_args=(x_val, y_val),
        )


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"steps": 0}, ValueError, "steps: must be >= 1"),
        ({"steps": 2.0}, TypeError, "steps: expected a positive int"),
        ({"learning_rate": 0.0}, ValueError, "learning_rate: must be > 0"),
        ({"learning_rate": "0.1"}, TypeError, "learning_rate: expected a float"),
        ({"momentum": 1.0}, ValueError, r"momentum: must be in \[0, 1\)"),
        ({"inner_loss": "ridge"}, TypeError, "inner_loss: expected a callable"),
        ({"hparams": [1.0]}, TypeError, "hparams"),
    ],
)
def test_bad_arguments_raise_before_computing(overrides, error, match):
    calls = []

    def counting_loss(params, hparams):
        calls.append(1)
        return (params**2).sum()

    arguments = dict(
        inner_loss=counting_loss,
        outer_loss=counting_loss,
        params=torch.ones(2),
        hparams=torch.ones(2),
        steps=3,
        learning_rate=0.1,
    )
    arguments.update(overrides)
    with pytest.raises(error, match=match):
        implicitfn.unrolled_hypergradient(
            arguments.pop("inner_loss"),
            arguments.pop("outer_loss"),
            arguments.pop("params"),
            arguments.pop("hparams"),
            **arguments,
        )
    assert not calls


@pytest.mark.parametrize("steps", [2, 8])
def test_the_unrolled_adjoint_equals_neumann_through_one_decorated_solver(ridge, steps):
    """The same decorated inner solver, differentiated by either adjoint, in reverse and forward
    mode: unrolling k steps from w* is the Neumann series with k terms."""
    x, y, x_val, y_val, penalty, learning_rate = ridge
    neumann = implicitfn.ImplicitAdjoint(
        solver=implicitfn.Neumann(max_steps=steps, alpha=learning_rate)
    )
    unrolling = implicitfn.UnrolledAdjoint(steps=steps, learning_rate=learning_rate)
    results = {}
    for name, adjoint in (("neumann", neumann), ("unrolled", unrolling)):

        @implicitfn.implicit_diff(implicitfn.stationarity(ridge_loss), adjoint=adjoint)
        def fit(params, hparams, x, y):
            return td(w=ridge_solution(hparams["penalty"], x, y))

        def objective(lam, fit=fit):
            w = fit(td(w=torch.zeros(4, dtype=torch.float64)), td(penalty=lam), x, y)
            return validation_loss(w, None, x_val, y_val)

        results[name] = (torch.func.grad(objective)(penalty), torch.func.jacfwd(objective)(penalty))
    assert_trees_close(results["unrolled"], results["neumann"])


def test_the_unrolled_adjoint_reports_divergence(ridge):
    x, y, x_val, y_val, penalty, learning_rate = ridge
    w_star = td(w=ridge_solution(penalty, x, y))
    with pytest.raises(implicitfn.ImplicitSolveError, match="NaN/Inf"):
        implicitfn.hypergradient(
            ridge_loss, validation_loss, w_star, td(penalty=penalty), inner_args=(x, y),
            outer_args=(x_val, y_val),
            adjoint=implicitfn.UnrolledAdjoint(steps=2000, learning_rate=50 * learning_rate),
        )  # fmt: skip
    with pytest.raises(ValueError, match="learning_rate: must be > 0"):
        implicitfn.UnrolledAdjoint(steps=3, learning_rate=0.0)
    with pytest.raises(TypeError, match="steps: expected a positive int"):
        implicitfn.UnrolledAdjoint(steps=2.5, learning_rate=0.1)
