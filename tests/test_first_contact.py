"""Issue 16, "Real models on first contact": each numbered case, written as the user program
that found it (scikit-learn digits, ordinary PyTorch habits), asserting the right answer
against a dense float64 implicit-function-theorem oracle (`helpers.dense_implicit_hypergradient`)
or the clear error or warning the user now gets.

The cases: 1 the caller's tensors are never changed; 2 `net(x)` instead of `apply(params, x)`;
3 a small MLP at the defaults; 4 BatchNorm and Dropout; 5 bad values; 6 calling conventions;
7 `implicitfn.minimize` instead of ten lines.
"""

from __future__ import annotations

import functools
import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from helpers import (
    adam_in_place,
    assert_untouched,
    dense_implicit_hypergradient,
    forward_over_reverse_hessian,
    lbfgs_in_place,
    ravel_tree,
    relative_error,
    snapshot,
    storage,
)
from sklearn import datasets
from sklearn.datasets import load_digits

import implicitfn

F64 = torch.float64


@functools.cache
def _digits_arrays():
    return load_digits(return_X_y=True)


def digits(n_train: int, n_val: int, dtype=F64):
    """Digits scaled to [0, 1]: (x, y) for training, then (x_val, y_val) after them."""
    images, labels = _digits_arrays()
    x = torch.tensor(images / 16.0, dtype=dtype)
    y = torch.tensor(labels)
    end = n_train + n_val
    return x[:n_train], y[:n_train], x[n_train:end], y[n_train:end]


def weight_decay(params):
    return sum((w**2).sum() for w in params.values(True, True))


# -- 1. The caller's tensors change -------------------------------------------------------------


def logistic_regression(n_train=200, n_val=100):
    x, y, x_val, y_val = digits(n_train, n_val)
    torch.manual_seed(0)
    apply, params = implicitfn.functional_model(torch.nn.Linear(64, 10).to(F64))

    def train_loss(params, hparams, x, y):
        return F.cross_entropy(apply(params, x), y) + 0.5 * hparams["decay"] * weight_decay(params)

    def val_loss(params, x, y):
        return F.cross_entropy(apply(params, x), y)

    return apply, params, train_loss, val_loss, (x, y, x_val, y_val)


def test_case1_in_place_torch_optim_leaves_the_callers_tensors_alone():
    _, params, train_loss, val_loss, (x, y, x_val, y_val) = logistic_regression()
    fit = implicitfn.implicit_diff(implicitfn.stationarity(train_loss))(lbfgs_in_place(train_loss))
    hparams = {"decay": torch.tensor(1e-2, dtype=F64, requires_grad=True)}
    params_before, hparams_before = snapshot(params), snapshot(hparams)
    data_before = snapshot((x, y))

    w = fit(params, hparams, x, y)
    assert_untouched(params, params_before)
    assert not storage(w) & storage(params), "the solution aliases the caller's params"
    val_loss(w, x_val, y_val).backward()

    assert_untouched(params, params_before)
    assert_untouched(hparams, hparams_before)
    assert_untouched((x, y), data_before)
    expected = dense_implicit_hypergradient(
        lambda w, h: train_loss(w, h, x, y),
        lambda w, h: val_loss(w, x_val, y_val),
        w.detach(),
        {"decay": hparams["decay"].detach()},
    )
    # The default backward solve stops at a relative residual of 1e-5.
    torch.testing.assert_close(hparams["decay"].grad, expected["decay"], rtol=1e-4, atol=0)


def test_case1_warm_start_from_the_last_solution_keeps_both_graphs_intact():
    """The variant that ended in torch's "modified by an inplace operation": the second solve
    starts from the first solution (a tensor in the autograd graph) and trains it in place."""
    _, params, train_loss, val_loss, (x, y, x_val, y_val) = logistic_regression()
    fit = implicitfn.implicit_diff(implicitfn.stationarity(train_loss))(lbfgs_in_place(train_loss))
    decay = torch.tensor(1e-2, dtype=F64, requires_grad=True)
    first = fit(params, {"decay": decay}, x, y)
    first_before = snapshot(first)
    second = fit(first, {"decay": decay}, x, y)
    assert_untouched(first, first_before)
    assert not storage(second) & storage(first)
    (val_loss(first, x_val, y_val) + val_loss(second, x_val, y_val)).backward()

    def oracle(solution):
        return dense_implicit_hypergradient(
            lambda w, h: train_loss(w, {"decay": h}, x, y),
            lambda w, h: val_loss(w, x_val, y_val),
            solution.detach(),
            decay.detach(),
        )

    torch.testing.assert_close(decay.grad, oracle(first) + oracle(second), rtol=1e-4, atol=0)


def test_case1_a_solver_that_returns_its_input_does_not_alias_the_callers_tensors():
    _, params, train_loss, _, (x, y, _, _) = logistic_regression(50, 10)

    @implicitfn.implicit_diff(implicitfn.stationarity(train_loss))
    def no_op(params, hparams, x, y):
        return params

    hparams = {"decay": torch.tensor(1e-2, dtype=F64)}
    w = no_op(params, hparams, x, y)
    assert not storage(w) & storage(params)
    assert not storage(w) & storage(hparams)


@pytest.mark.parametrize("style", ["positional", "keyword"])
def test_case1_changing_the_data_in_place_is_refused_naming_the_argument(style):
    _, params, train_loss, _, (x, y, _, _) = logistic_regression(50, 10)

    @implicitfn.implicit_diff(implicitfn.stationarity(train_loss))
    def fit(params, hparams, x, y):
        x -= x.mean(0)  # centring the data in place: the caller's x would change
        return params

    hparams = {"decay": torch.tensor(1e-2, dtype=F64)}
    x = x.clone()
    if style == "positional":
        name = r"args\[0\]"
        call = functools.partial(fit, params, hparams, x, y)
    else:
        name = r"(kwargs\['x'\]|x)"
        call = functools.partial(fit, params, hparams, y=y, x=x)
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    # The argument as the user passed it: args[0] is their first data argument (not a path
    # into an internal (args, kwargs) pair), and a keyword argument is named by its keyword.
    assert re.match(rf"fit modified {name} in place", message), message
    assert "x = x.clone()" in message


# -- 2. net(x) instead of apply(params, x) -------------------------------------------------------


def test_case2_calling_the_module_instead_of_apply_is_named_as_the_mistake():
    x, y, x_val, y_val = digits(100, 50)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10))
    net = net.to(F64)
    apply, params = implicitfn.functional_model(net)

    def train_loss(params, hparams, x, y):  # the mistake: the module, not the params argument
        penalty = sum((w**2).sum() for w in net.parameters())
        return F.cross_entropy(net(x), y) + 0.5 * hparams["decay"] * penalty

    @implicitfn.implicit_diff(implicitfn.stationarity(train_loss))
    def fit(params, hparams, x, y):
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(20):
            optimizer.zero_grad()
            train_loss(params, hparams, x, y).backward()
            optimizer.step()
        return params

    hparams = {"decay": torch.tensor(1e-2, dtype=F64, requires_grad=True)}
    w = fit(params, hparams, x, y)
    with pytest.raises(ValueError) as caught:
        F.cross_entropy(apply(w, x_val), y_val).backward()
    message = str(caught.value)
    assert "does not depend on the parameters" in message and "dF/dw = 0" in message
    assert "net(x)" in message and "apply(params, x)" in message
    assert "did not converge" not in message  # not blamed on the solver
    assert hparams["decay"].grad is None
    # The one-line solver says so before its first step.
    with pytest.raises(ValueError, match=r"loss: does not depend on params.*not net\(x\)"):
        implicitfn.minimize(train_loss, params, hparams, x, y)


# -- 3. A small MLP at the defaults --------------------------------------------------------------


def mlp_trained_with_adam(adjoint=None):
    """The issue's program: a 64-16-10 tanh MLP (1,210 parameters) on 1,000 digits, one log
    weight decay per parameter tensor, full-batch Adam (lr 1e-2, 1,000 steps): not a tight
    optimum; the Hessian there has a few small negative eigenvalues."""
    x, y, x_val, y_val = digits(1000, 797)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    apply, params = implicitfn.functional_model(net.to(F64))
    assert sum(p.numel() for p in params.values(True, True)) == 1210

    def train_loss(params, log_decay, x, y):
        named = params.flatten_keys(".")
        penalty = sum(log_decay[k].exp() * (named[k] ** 2).sum() for k in log_decay)
        return F.cross_entropy(apply(params, x), y) + 0.5 * penalty

    def val_loss(params, x, y):
        return F.cross_entropy(apply(params, x), y)

    fit = implicitfn.implicit_diff(implicitfn.stationarity(train_loss), adjoint=adjoint)(
        adam_in_place(train_loss, steps=1000)
    )
    log_decay = {
        name: torch.tensor(math.log(1e-3), dtype=F64, requires_grad=True)
        for name, _ in net.named_parameters()
    }
    w = fit(params, log_decay, x, y)
    return w, log_decay, train_loss, val_loss, (x, y, x_val, y_val)


def test_case3_small_mlp_at_the_defaults_gives_the_dense_answer():
    """The default adjoint, on the point Adam returns, within 10% of the dense float64 answer.

    (Needs the structure-based default solver: CG meets the negative curvature and raises.)
    """
    w, log_decay, train_loss, val_loss, (x, y, x_val, y_val) = mlp_trained_with_adam()
    val_loss(w, x_val, y_val).backward()  # warnings are errors here: quiet, too
    got = {name: h.grad for name, h in log_decay.items()}
    point = {name: h.detach() for name, h in log_decay.items()}
    flat, unravel = ravel_tree(w.detach())
    hessian = torch.func.hessian(lambda v: train_loss(unravel(v), point, x, y))(flat)
    assert (torch.linalg.eigvalsh(hessian) < 0).sum() >= 1, "the issue's point: indefinite"
    expected = dense_implicit_hypergradient(
        lambda w, h: train_loss(w, h, x, y),
        lambda w, h: val_loss(w, x_val, y_val),
        w.detach(),
        point,
        matrix=hessian,
    )
    assert relative_error(got, expected) <= 0.10, (got, expected)


def test_case3_cg_on_the_indefinite_hessian_says_why_and_what_to_do():
    adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.CG())
    w, log_decay, _, val_loss, (_, _, x_val, y_val) = mlp_trained_with_adam(adjoint)
    with pytest.raises(implicitfn.ImplicitSolveError) as caught:
        line = inspect.currentframe().f_lineno + 1
        val_loss(w, x_val, y_val).backward()
    message = str(caught.value)
    for part in ("outcome=negative_curvature", "condition Stationarity", "curvature Hessian"):
        assert part in message, message
    assert "solver CG(" in message
    assert "MINRES" in message and "GaussNewton" in message  # the fixes that fit the outcome
    assert all(h.grad is None for h in log_decay.values())
    # With on_failure="warn" the warning points at the user's line, not into implicitfn.
    adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.CG(), on_failure="warn")
    w, *_ = mlp_trained_with_adam(adjoint)
    with pytest.warns(implicitfn.ImplicitSolveWarning) as record:
        line = inspect.currentframe().f_lineno + 1
        val_loss(w, x_val, y_val).backward()
    assert (record[0].filename, record[0].lineno) == (__file__, line)


# -- 4. BatchNorm and Dropout in train mode -------------------------------------------------------


def gauss_newton_matrix(apply, solution, decay, x, y):
    r"""$J^\top H_{out} J + \mathrm{decay}\, I$ for the cross-entropy of `apply` at `solution`,
    in the order of `ravel_tree(solution)`, with torch.func only."""
    flat, unravel = ravel_tree(solution)
    logits = apply(unravel(flat), x)
    jacobian = torch.func.jacrev(lambda v: apply(unravel(v), x).reshape(-1))(flat)
    output_hessian = torch.func.hessian(lambda out: F.cross_entropy(out.reshape(logits.shape), y))(
        logits.reshape(-1)
    )
    return jacobian.T @ output_hessian @ jacobian + decay * torch.eye(flat.numel(), dtype=F64)


def test_case4_batchnorm_mlp_exact_hessian_and_gauss_newton_without_side_effects():
    x, y, x_val, y_val = digits(100, 100)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 10)
    ).to(F64)
    module_before = {k: v.clone() for k, v in net.state_dict().items()}
    apply, params = implicitfn.functional_model(net)  # batch statistics, never updated

    def penalty(params, hparams, x, y):
        return 0.5 * hparams["decay"] * weight_decay(params)

    train_loss = implicitfn.CompositeLoss(
        predict=lambda params, hparams, x, y: apply(params, x),
        output_loss=lambda logits, hparams, x, y: F.cross_entropy(logits, y),
        penalty=penalty,
    )

    def val_loss(params, x, y):
        return F.cross_entropy(apply(params, x), y)

    condition = implicitfn.stationarity(train_loss)
    exact = implicitfn.ImplicitAdjoint(solver=implicitfn.MINRES(max_steps=2000, rtol=1e-11))
    gauss_newton = implicitfn.ImplicitAdjoint(
        solver=implicitfn.CG(max_steps=2000, rtol=1e-11), curvature=implicitfn.GaussNewton()
    )
    solve = lbfgs_in_place(train_loss, max_iter=300, tolerance_grad=1e-6)
    decay = torch.tensor(0.1, dtype=F64, requires_grad=True)
    w = implicitfn.implicit_diff(condition, adjoint=exact)(solve)(params, {"decay": decay}, x, y)
    val_loss(w, x_val, y_val).backward()
    exact_grad, decay.grad = decay.grad, None
    # The same inner solver under the other adjoint, warm-started from the solution.
    w_gn = implicitfn.implicit_diff(condition, adjoint=gauss_newton)(solve)(
        w.detach(), {"decay": decay}, x, y
    )
    val_loss(w_gn, x_val, y_val).backward()

    def oracle(solution, **matrix):
        return dense_implicit_hypergradient(
            lambda w, h: train_loss(w, {"decay": h}, x, y),
            lambda w, h: val_loss(w, x_val, y_val),
            solution.detach(),
            decay.detach(),
            **matrix,
        )

    expected = oracle(w, hessian=forward_over_reverse_hessian)
    torch.testing.assert_close(exact_grad, expected, rtol=1e-6, atol=0)
    matrix = gauss_newton_matrix(apply, w_gn.detach(), decay.detach(), x, y)
    torch.testing.assert_close(decay.grad, oracle(w_gn, matrix=matrix), rtol=1e-6, atol=0)
    # vmapped Gauss-Newton products: a batch of vectors at once, as the dense matrix gives.
    operator = implicitfn.GaussNewton().linearize(
        train_loss, w_gn.detach(), {"decay": decay.detach()}, x, y
    )
    _, unravel = ravel_tree(w_gn.detach())
    vectors = torch.randn(3, matrix.shape[0], dtype=F64)

    def product(v):
        return torch.cat([t.reshape(-1) for t in pytree.tree_leaves(operator.mv(unravel(v)))])

    torch.testing.assert_close(
        torch.func.vmap(product)(vectors), vectors @ matrix.T, rtol=1e-9, atol=1e-12
    )
    # Nothing of the module moved: parameters, running statistics, num_batches_tracked, modes.
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in module_before.items())
    assert all(m.training for m in net.modules())


def test_case4_dropout_in_the_training_loss_gives_one_operator_per_backward_pass():
    """Dropout on inside the condition: every evaluation of one backward pass sees the same
    masks, so the solve is of one operator (the Hessian of the loss with those masks), two
    passes from the same RNG state agree exactly, and the user's RNG stream does not move."""
    x, y, x_val, y_val = digits(100, 100)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 10)
    ).to(F64)
    train_apply, params = implicitfn.functional_model(net, dropout="on")
    evaluate, _ = implicitfn.functional_model(net)  # dropout off, for validation

    def train_loss(params, hparams, x, y):
        data = F.cross_entropy(train_apply(params, x), y)
        return data + 0.5 * hparams["decay"] * weight_decay(params)

    # One mask's loss is not minimised where Adam on fresh masks stops: no optimality warning.
    adjoint = implicitfn.ImplicitAdjoint(
        solver=implicitfn.MINRES(max_steps=2000, rtol=1e-11), inner_rtol=None
    )

    fit = implicitfn.implicit_diff(implicitfn.stationarity(train_loss), adjoint=adjoint)(
        adam_in_place(train_loss, steps=200)
    )
    decay = torch.tensor(0.1, dtype=F64, requires_grad=True)
    w = fit(params, {"decay": decay}, x, y)
    val = F.cross_entropy(evaluate(w, x_val), y_val)
    grads = []
    for _ in range(2):
        torch.manual_seed(123)
        state = torch.random.get_rng_state()
        (grad,) = torch.autograd.grad(val, decay, retain_graph=True)
        assert torch.equal(torch.random.get_rng_state(), state), "the backward pass drew numbers"
        grads.append(grad)
    assert torch.equal(grads[0], grads[1])

    def with_the_masks_of(state, fn):
        def fixed(*args):
            torch.random.set_rng_state(state)
            return fn(*args)

        return fixed

    with torch.random.fork_rng(devices=[]):
        expected = dense_implicit_hypergradient(
            with_the_masks_of(state, lambda w, h: train_loss(w, {"decay": h}, x, y)),
            lambda w, h: F.cross_entropy(evaluate(w, x_val), y_val),
            w.detach(),
            decay.detach(),
            # jacfwd vmaps over directions: one mask for all of them, the one the state gives.
            hessian=lambda fn: torch.func.jacfwd(torch.func.grad(fn), randomness="same"),
        )
    torch.testing.assert_close(grads[0], expected, rtol=1e-6, atol=0)


# -- 5. Bad values ------------------------------------------------------------------------------


def logistic_fit(train_loss):
    """The in-place L-BFGS inner solver, decorated with the default adjoint."""
    return implicitfn.implicit_diff(implicitfn.stationarity(train_loss))(lbfgs_in_place(train_loss))


def test_case5_nan_in_the_hyperparameters_is_named_before_any_computing():
    _, params, train_loss, _, (x, y, _, _) = logistic_regression(50, 10)
    calls = []
    fit = logistic_fit(lambda *a: calls.append(1) or train_loss(*a))
    for bad in (float("nan"), float("inf")):
        hparams = {"decay": torch.tensor(bad, dtype=F64, requires_grad=True)}
        with pytest.raises(ValueError, match=r"^hparams\['decay'\]: contains NaN or Inf"):
            fit(params, hparams, x, y)
    assert not calls


@pytest.mark.parametrize(
    ("style", "name"), [("positional", r"args\[0\]"), ("keyword", r"(kwargs\['x'\]|x)")]
)
def test_case5_nan_in_the_data_is_named_as_the_user_passed_it(style, name):
    """Passed by position, the data is `args[0]`; passed as x=..., it is named by its keyword
    ("args[0]" would point at a positional argument that does not exist)."""
    _, params, train_loss, _, (x, y, _, _) = logistic_regression(50, 10)
    fit = logistic_fit(train_loss)
    hparams = {"decay": torch.tensor(1e-2, dtype=F64)}
    bad = x.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match=rf"^{name}: contains NaN or Inf"):
        if style == "positional":
            fit(params, hparams, bad, y)
        else:
            fit(params, hparams, x=bad, y=y)


def test_case5_nan_in_the_outer_loss_is_named():
    _, params, train_loss, val_loss, (x, y, x_val, y_val) = logistic_regression(100, 50)
    fit = logistic_fit(train_loss)
    decay = torch.tensor(1e-2, dtype=F64, requires_grad=True)
    w = fit(params, {"decay": decay}, x, y)
    bad = x_val.clone()
    bad[0, 0] = float("nan")  # a NaN in the validation data reaches only the outer loss
    with pytest.raises(ValueError, match=r"^dL_V/dw\['weight'\].*outer loss"):
        val_loss(w, bad, y_val).backward()
    assert decay.grad is None


@pytest.mark.parametrize("on_failure", ["raise", "warn"])
def test_case5_nan_only_in_the_mixed_derivative_raises_naming_the_leaf(on_failure):
    """F = dL/dw is finite at sqrt(0); its derivative in the hyperparameter is not."""
    _, params, _, val_loss, (x, y, x_val, y_val) = logistic_regression(100, 50)
    apply, _ = implicitfn.functional_model(torch.nn.Linear(64, 10).to(F64))

    def train_loss(params, hparams, x, y):
        strength = hparams["decay"] + hparams["extra"].sqrt()
        return F.cross_entropy(apply(params, x), y) + 0.5 * strength * weight_decay(params)

    adjoint = implicitfn.ImplicitAdjoint(on_failure=on_failure)
    fit = implicitfn.implicit_diff(implicitfn.stationarity(train_loss), adjoint=adjoint)(
        lbfgs_in_place(train_loss)
    )
    hparams = {
        "decay": torch.tensor(1e-2, dtype=F64, requires_grad=True),
        "extra": torch.tensor(0.0, dtype=F64, requires_grad=True),
    }
    w = fit(params, hparams, x, y)
    with pytest.raises(implicitfn.ImplicitSolveError) as caught:
        val_loss(w, x_val, y_val).backward()
    message = str(caught.value)
    assert message.startswith("The gradient for hparams['extra'] is NaN/Inf"), message
    assert "hparams['decay']" not in message
    assert hparams["decay"].grad is None and hparams["extra"].grad is None


def test_case5_nan_only_in_the_mixed_derivative_of_keyword_data_names_the_keyword():
    """As above, for a differentiated data argument passed by keyword."""
    apply, params = implicitfn.functional_model(torch.nn.Linear(64, 10).to(F64))
    x, y, x_val, y_val = digits(100, 50)

    def train_loss(params, hparams, x, y, extra):
        strength = hparams["decay"] + extra.sqrt()
        return F.cross_entropy(apply(params, x), y) + 0.5 * strength * weight_decay(params)

    @implicitfn.implicit_diff(implicitfn.stationarity(train_loss))
    def fit(params, hparams, x, y, extra):
        return lbfgs_in_place(lambda p, h, x, y: train_loss(p, h, x, y, extra))(
            params, hparams, x, y
        )

    extra = torch.tensor(0.0, dtype=F64, requires_grad=True)
    w = fit(params, {"decay": torch.tensor(1e-2, dtype=F64)}, x, y=y, extra=extra)
    with pytest.raises(implicitfn.ImplicitSolveError) as caught:
        F.cross_entropy(apply(w, x_val), y_val).backward()
    message = str(caught.value)
    # One positional data argument was passed: "args[2]" names nothing the user wrote.
    assert re.match(r"The gradient for (kwargs\['extra'\]|extra) is NaN/Inf", message), message
    assert extra.grad is None


def test_case5_a_far_from_optimal_inner_solution_warns_with_the_number():
    _, params, train_loss, val_loss, (x, y, x_val, y_val) = logistic_regression(200, 100)
    infos = []
    adjoint = implicitfn.ImplicitAdjoint(callback=infos.append)
    fit = implicitfn.implicit_diff(implicitfn.stationarity(train_loss), adjoint=adjoint)(
        adam_in_place(train_loss, steps=5)
    )
    decay = torch.tensor(1e-2, dtype=F64, requires_grad=True)
    w = fit(params, {"decay": decay}, x, y)
    gradient = torch.func.grad(train_loss)(w.detach(), {"decay": decay.detach()}, x, y)
    norm = float(torch.sqrt(sum((g**2).sum() for g in gradient.values(True, True))))
    assert norm > 0.1  # five Adam steps from the start: far from the optimum
    with pytest.warns(implicitfn.InnerSolutionWarning) as record:
        line = inspect.currentframe().f_lineno + 1
        val_loss(w, x_val, y_val).backward()
    message = str(record[0].message)
    assert f"||F(w*, lambda)|| = {norm:.2e}" in message, (norm, message)
    assert "solve the inner problem more accurately" in message
    assert (record[0].filename, record[0].lineno) == (__file__, line)  # the user's line
    (info,) = infos
    assert float(info.optimality_norm) == pytest.approx(norm, rel=1e-6)
    assert float(info.relative_optimality) > adjoint.inner_rtol
    assert decay.grad is not None and torch.isfinite(decay.grad)


# -- 6. Calling conventions ---------------------------------------------------------------------


def test_case6_keyword_call_equals_positional_call():
    """Keyword data is differentiated like positional data (here: the training images, as in
    dataset distillation), and the answer is the dense one."""
    _, params, train_loss, val_loss, (x, y, x_val, y_val) = logistic_regression(60, 40)
    fit = logistic_fit(train_loss)
    results = []
    for call in ("positional", "last-keyword", "all-keywords"):
        decay = torch.tensor(1e-2, dtype=F64, requires_grad=True)
        images = x.clone().requires_grad_()
        if call == "positional":
            w = fit(params, {"decay": decay}, images, y)
        elif call == "last-keyword":
            w = fit(params, {"decay": decay}, images, y=y)
        else:
            w = fit(params, {"decay": decay}, y=y, x=images)
        val_loss(w, x_val, y_val).backward()
        results.append((w.detach(), decay.grad, images.grad))
    for w, decay_grad, images_grad in results[1:]:
        assert all(
            torch.equal(a, b) for a, b in zip(w.values(), results[0][0].values(), strict=True)
        )
        torch.testing.assert_close(decay_grad, results[0][1], rtol=1e-12, atol=0)
        torch.testing.assert_close(images_grad, results[0][2], rtol=1e-12, atol=1e-15)
    expected = dense_implicit_hypergradient(
        lambda w, z: train_loss(w, {"decay": z["decay"]}, z["x"], y),
        lambda w, z: val_loss(w, x_val, y_val),
        results[0][0],
        {"decay": torch.tensor(1e-2, dtype=F64), "x": x},
    )
    torch.testing.assert_close(results[0][1], expected["decay"], rtol=1e-4, atol=0)
    assert relative_error(results[0][2], expected["x"]) < 1e-4


def ridge_objective(params, lam, X, y):
    """jaxopt's implicit_diff_test ridge objective, ported."""
    residuals = X @ params - y
    return 0.5 * (residuals**2).mean() + 0.5 * lam * (params**2).sum()


def ridge_closed_form(lam, X, y):
    return torch.linalg.solve(
        X.T @ X + lam * len(y) * torch.eye(X.shape[1], dtype=X.dtype), X.T @ y
    )


def ridge_jacobian_in_lam(lam, X, y):
    """d w*/d lam in float64 from the closed form: -(X^T X + lam n I)^{-1} n w*."""
    X, y = X.double(), y.double()
    matrix = X.T @ X + float(lam) * len(y) * torch.eye(X.shape[1], dtype=F64)
    return -torch.linalg.solve(matrix, len(y) * torch.linalg.solve(matrix, X.T @ y))


def regression_data(dtype=torch.float32):
    X, y = datasets.make_regression(n_samples=10, n_features=3, random_state=0)
    return torch.tensor(X, dtype=dtype), torch.tensor(y, dtype=dtype)


def test_case6_has_aux_returns_the_aux_beside_a_differentiable_solution():
    """jaxopt's test_custom_root_with_has_aux, ported (jacrev in lam, data as keywords), plus
    `.backward()` on the solution of a pair."""
    X, y = regression_data()

    @implicitfn.implicit_diff(implicitfn.stationarity(ridge_objective), has_aux=True)
    def ridge_solver_with_aux(init_params, lam, X, y):
        solution = ridge_closed_form(lam, X, y)
        return solution, {"loss": ridge_objective(solution, lam, X, y), "steps": 1}

    lam = torch.tensor(5.0)
    solution, aux = ridge_solver_with_aux(torch.zeros(3), lam, X=X, y=y)
    torch.testing.assert_close(solution, ridge_closed_form(lam, X, y))
    assert aux["steps"] == 1 and not aux["loss"].requires_grad
    jacobian, loss = torch.func.jacrev(
        lambda lam: (lambda out: (out[0], out[1]["loss"]))(
            ridge_solver_with_aux(torch.zeros(3), lam, X=X, y=y)
        ),
        has_aux=True,
    )(lam)
    torch.testing.assert_close(
        jacobian, ridge_jacobian_in_lam(lam, X, y).float(), rtol=1e-4, atol=1e-5
    )
    lam = torch.tensor(5.0, requires_grad=True)
    solution, _ = ridge_solver_with_aux(torch.zeros(3), lam, X, y)
    solution.sum().backward()
    torch.testing.assert_close(
        lam.grad, ridge_jacobian_in_lam(5.0, X, y).sum().float(), rtol=1e-4, atol=1e-6
    )
    with pytest.raises(TypeError, match=r"must return a pair \(params, aux\) with has_aux=True"):
        implicitfn.implicit_diff(implicitfn.stationarity(ridge_objective), has_aux=True)(
            lambda p, lam, X, y: ridge_closed_form(lam, X, y)
        )(torch.zeros(3), lam, X, y)


@pytest.mark.parametrize("container", [tuple, list])
def test_case6_tuple_and_list_params_and_none_entries(container):
    x, y, x_val, y_val = digits(60, 40)

    def train_loss(params, hparams, x, y, mask=None):
        weight, bias = params
        decay, unused = hparams
        assert unused is None and mask is None
        logits = x @ weight.T + bias
        return F.cross_entropy(logits, y) + 0.5 * decay * ((weight**2).sum() + (bias**2).sum())

    def val_loss(params):
        weight, bias = params
        return F.cross_entropy(x_val @ weight.T + bias, y_val)

    @implicitfn.implicit_diff(implicitfn.stationarity(train_loss))
    def fit(params, hparams, x, y, mask=None):
        for p in params:
            p.requires_grad_()
        optimizer = torch.optim.LBFGS(
            params, max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
        )

        def closure():
            optimizer.zero_grad()
            loss = train_loss(params, hparams, x, y, mask)
            loss.backward()
            return loss

        optimizer.step(closure)
        return container(p.detach() for p in params)

    params = container([torch.zeros(10, 64, dtype=F64), torch.zeros(10, dtype=F64)])
    decay = torch.tensor(1e-2, dtype=F64, requires_grad=True)
    w = fit(params, (decay, None), x, y, mask=None)
    assert type(w) is container and len(w) == 2
    assert all(torch.equal(p, torch.zeros_like(p)) for p in params)
    val_loss(w).backward()
    expected = dense_implicit_hypergradient(
        lambda w, h: train_loss(w, (h, None), x, y),
        lambda w, h: val_loss(w),
        container(p.detach() for p in w),
        decay.detach(),
    )
    torch.testing.assert_close(decay.grad, expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    ("hparams", "name"),
    [
        (5.0, "hparams"),
        ({"decay": 1e-2}, r"hparams\['decay'\]"),
        ((torch.tensor(1.0), 0.1), r"hparams\[1\]"),
    ],
)
def test_case6_a_python_float_hyperparameter_is_named(hparams, name):
    X, y = regression_data()
    fit = implicitfn.implicit_diff(implicitfn.stationarity(ridge_objective))(lambda p, lam, X, y: p)
    with pytest.raises(
        TypeError,
        match=rf"^{name}: a Python float cannot be differentiated; pass torch.tensor\(",
    ):
        fit(torch.zeros(3), hparams, X, y)


@pytest.mark.parametrize("lam_dtype", [torch.float32, torch.float64])
def test_case6_forward_mode_keeps_the_float32_dtype_of_the_solution(lam_dtype):
    """jaxopt's test_root_jvp, ported: a float32 ridge problem, the 0-dim hyperparameter
    lam = 5, the tangent of the solution in lam by forward mode."""
    X, y = regression_data()

    @implicitfn.implicit_diff(implicitfn.stationarity(ridge_objective))
    def ridge_solver(init_params, lam, X, y):
        return ridge_closed_form(lam.to(X.dtype), X, y)

    lam = torch.tensor(5.0, dtype=lam_dtype)
    expected = ridge_jacobian_in_lam(5.0, X, y)
    for call in (
        lambda lam: ridge_solver(torch.zeros(3), lam, X, y),
        lambda lam: ridge_solver(torch.zeros(3), lam, X=X, y=y),
    ):
        solution, tangent = torch.func.jvp(call, (lam,), (torch.ones((), dtype=lam_dtype),))
        assert solution.dtype == tangent.dtype == torch.float32
        torch.testing.assert_close(tangent.double(), expected, rtol=1e-4, atol=1e-5)
        jacobian = torch.func.jacfwd(call)(lam)
        assert jacobian.dtype == torch.float32
        torch.testing.assert_close(jacobian.double(), expected, rtol=1e-4, atol=1e-5)


# -- 7. One line instead of ten ------------------------------------------------------------------


def test_case7_minimize_in_one_line_equals_the_ten_line_version():
    _, params, train_loss, val_loss, (x, y, x_val, y_val) = logistic_regression(200, 100)
    params_before = snapshot(params)

    # Ten lines: the boilerplate every inner solver used to repeat.
    @implicitfn.implicit_diff(implicitfn.stationarity(train_loss))
    def fit(params, hparams, x, y):
        params = params.clone().requires_grad_()
        optimizer = torch.optim.LBFGS(
            params.values(True, True),
            max_iter=500,
            tolerance_grad=1e-9,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )

        def closure():
            optimizer.zero_grad()
            with torch.enable_grad():
                loss = train_loss(params, hparams, x, y)
                loss.backward()
            return loss

        optimizer.step(closure)
        return params.detach()

    decay_ten = torch.tensor(1e-2, dtype=F64, requires_grad=True)
    w_ten = fit(params, {"decay": decay_ten}, x, y)
    val_loss(w_ten, x_val, y_val).backward()

    # One line.
    decay_one = torch.tensor(1e-2, dtype=F64, requires_grad=True)
    w_one = implicitfn.minimize(train_loss, params, {"decay": decay_one}, x, y, tol=1e-8)
    val_loss(w_one, x_val, y_val).backward()

    assert_untouched(params, params_before)
    assert not storage(w_one) & storage(params)
    assert type(w_one) is type(params) and w_one.keys() == params.keys()
    for name in ("weight", "bias"):
        torch.testing.assert_close(w_one[name], w_ten[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(decay_one.grad, decay_ten.grad, rtol=1e-4, atol=0)
    expected = dense_implicit_hypergradient(
        lambda w, h: train_loss(w, h, x, y),
        lambda w, h: val_loss(w, x_val, y_val),
        w_one.detach(),
        {"decay": decay_one.detach()},
    )
    torch.testing.assert_close(decay_one.grad, expected["decay"], rtol=1e-4, atol=0)
