"""The hyper-optimisation loop: direction, resume, callbacks, failures and bad input."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torchopt
from tensordict import TensorDict

import implicitfn
from implicitfn import hyperopt

SGD = functools.partial(torch.optim.SGD, lr=0.2)
ADAM = functools.partial(torch.optim.Adam, lr=0.05)


def ridge_problem(seed=0, n=30, d=6, noise=2.0):
    """Noisy training labels: the best ridge penalty for the clean validation set is large."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=gen, dtype=torch.float64)
    x, x_val = (torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    y = x @ w_true + noise * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y, x_val, x_val @ w_true


DECAY = hyperopt.WeightDecay("global", initial=1e-3)


def train_loss(params, hparams, x, y):
    return 0.5 * ((x @ params["w"] - y) ** 2).mean() + DECAY.penalty(hparams["decay"], params)


def val_loss(params, hparams, x, y):
    return 0.5 * ((x @ params["w"] - y) ** 2).mean()


def exact_val_loss(decay_raw, x, y, x_val, y_val):
    """Validation loss at the closed-form ridge solution for a raw global decay."""
    n, d = x.shape
    strength = DECAY.strength(decay_raw)
    w = torch.linalg.solve(x.T @ x / n + strength * torch.eye(d, dtype=x.dtype), x.T @ y / n)
    return val_loss({"w": w}, None, x_val, y_val)


def make_loop(inner=SGD, outer=ADAM, **overrides):
    config = dict(
        train_loss=train_loss,
        val_loss=val_loss,
        inner_optimizer=inner,
        outer_optimizer=outer,
        inner_steps=30,
        adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG(max_steps=20), inner_rtol=None),
        train_metrics={"mse": val_loss},
        val_metrics={"mse": val_loss},
    )
    config.update(overrides)
    return hyperopt.HyperOptimizer(**config)


def init_state(loop, seed=0, batch_size=None):
    x, y, x_val, y_val = ridge_problem(seed)
    params = TensorDict(w=torch.zeros(x.shape[1], dtype=torch.float64))
    hparams = TensorDict(decay=DECAY.init(params))
    train = hyperopt.Minibatches(x, y, batch_size=batch_size, seed=1)
    val = hyperopt.Minibatches(x_val, y_val, batch_size=batch_size, seed=2)
    return loop.init(params, hparams, train, val)


def test_hyperparameters_move_to_lower_validation_loss():
    x, y, x_val, y_val = ridge_problem()
    loop = make_loop(outer=functools.partial(torch.optim.Adam, lr=0.5))
    state = init_state(loop)
    start = state.hparams["decay"]
    before = exact_val_loss(start, x, y, x_val, y_val)
    history = loop.run(state, outer_steps=20, progress=False)
    after = exact_val_loss(state.hparams["decay"], x, y, x_val, y_val)
    assert state.hparams["decay"] > start + 2.0  # noisy labels call for more decay
    assert after < 0.7 * before
    assert history["val_loss"][-1] < history["val_loss"][0]
    assert set(history["outcome"]) == {"successful"} and len(history) == 20
    assert {"train_mse", "val_mse", "inner_gradient_norm", "relative_residual"} <= set(
        history.records[-1]
    )


def noisy_train_loss(params, hparams, x, y):
    # Input noise from the global RNG: the trajectory depends on the RNG state being restored.
    jitter = 1.0 + 0.01 * torch.randn(())
    return train_loss(params, hparams, jitter * x, y)


@pytest.mark.parametrize(
    ("inner", "outer"),
    [(ADAM, torchopt.adam(0.05)), (torchopt.sgd(0.05, momentum=0.9), ADAM)],
    ids=["torch-inner/torchopt-outer", "torchopt-inner/torch-outer"],
)
def test_resumed_run_continues_the_same_trajectory(tmp_path, inner, outer):
    loop = make_loop(inner, outer, train_loss=noisy_train_loss, inner_steps=5)

    torch.manual_seed(123)
    straight = init_state(loop, batch_size=8)
    loop.run(straight, outer_steps=6, progress=False)

    torch.manual_seed(123)
    interrupted = init_state(loop, batch_size=8)
    loop.run(interrupted, outer_steps=3, progress=False)
    torch.save(interrupted.state_dict(), tmp_path / "run.pt")
    torch.manual_seed(999)  # a different RNG state: the checkpoint must restore it
    resumed = init_state(loop, batch_size=8)
    resumed.load_state_dict(torch.load(tmp_path / "run.pt", weights_only=True))
    assert resumed.step == 3
    loop.run(resumed, outer_steps=6, progress=False)

    assert torch.equal(resumed.params["w"], straight.params["w"])
    assert torch.equal(resumed.hparams["decay"], straight.hparams["decay"])
    assert resumed.history.records == straight.history.records


def test_user_tensors_are_not_modified_and_copies_are_returned():
    loop = make_loop(outer=torchopt.adam(0.05))
    x, y, x_val, y_val = ridge_problem()
    params = TensorDict(w=torch.zeros(x.shape[1], dtype=torch.float64))
    hparams = TensorDict(decay=DECAY.init(params))
    params_before, hparams_before = params.clone(), hparams.clone()
    state = loop.init(
        params, hparams, hyperopt.Minibatches(x, y), hyperopt.Minibatches(x_val, y_val)
    )
    loop.run(state, outer_steps=2, progress=False)
    assert (params == params_before).all() and (hparams == hparams_before).all()
    view = state.params
    view["w"].add_(1.0)
    assert not torch.equal(view["w"], state.params["w"])


def test_checkpoint_callback_and_early_stopping(tmp_path):
    loop = make_loop()
    state = init_state(loop)
    path = tmp_path / "run.pt"
    seen = []

    def stop_at_four(state, record):
        seen.append(record["step"])
        return state.step == 4

    loop.run(
        state,
        outer_steps=10,
        callbacks=[hyperopt.Checkpoint(path, every=2), stop_at_four],
        progress=False,
    )
    assert state.step == 4 and seen == [1, 2, 3, 4]
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 4 and len(saved["history"]) == 4


def test_history_plot_is_saved(tmp_path):
    loop = make_loop()
    state = init_state(loop)
    history = loop.run(state, outer_steps=3, progress=False)
    figure = history.plot(tmp_path / "history.png")
    assert (tmp_path / "history.png").stat().st_size > 0
    assert len(figure.axes) == 4  # loss, mse, hypergradient norm, residual
    with pytest.raises(KeyError, match="not recorded"):
        history["accuracy"]


def test_unconverged_backward_solve_raises_or_is_recorded():
    truncated = implicitfn.CG(max_steps=1, rtol=1e-14)
    with pytest.raises(implicitfn.ImplicitSolveError):
        loop = make_loop(adjoint=implicitfn.ImplicitAdjoint(solver=truncated, inner_rtol=None))
        loop.step(init_state(loop))
    loop = make_loop(
        adjoint=implicitfn.ImplicitAdjoint(solver=truncated, on_failure="warn", inner_rtol=None)
    )
    state = init_state(loop)
    with pytest.warns(implicitfn.ImplicitSolveWarning):
        record = loop.step(state)
    assert record["outcome"] == "max_steps_reached" and record["solve_failed"] is True
    assert record["relative_residual"] > 1e-14


def test_inner_divergence_is_reported():
    loop = make_loop(inner=functools.partial(torch.optim.SGD, lr=1e20))
    with pytest.raises(FloatingPointError, match="inner optimiser"):
        loop.step(init_state(loop))


def test_empty_or_exhausted_validation_iterator():
    x, y, _, _ = ridge_problem()
    loop = make_loop()
    params = TensorDict(w=torch.zeros(x.shape[1], dtype=torch.float64))
    hparams = TensorDict(decay=DECAY.init(params))
    train = hyperopt.Minibatches(x, y)
    with pytest.raises(ValueError, match="val_batches: is empty"):
        loop.init(params, hparams, train, [])
    state = loop.init(params, hparams, train, iter([]))
    with pytest.raises(ValueError, match="val_batches: the iterator is empty or exhausted"):
        loop.step(state)
    assert torch.equal(state.params["w"], params["w"])  # nothing was computed
    state = loop.init(params, hparams, train, itertools.islice(itertools.repeat((x, y)), 1))
    loop.step(state)
    with pytest.raises(ValueError, match="exhausted"):
        loop.step(state)


def test_hyperparameters_unused_by_both_losses_are_refused():
    x, y, x_val, y_val = ridge_problem()
    loop = make_loop()
    params = TensorDict(w=torch.zeros(x.shape[1], dtype=torch.float64))
    hparams = TensorDict(decay=DECAY.init(params), forgotten=torch.zeros(3, dtype=torch.float64))
    state = loop.init(
        params, hparams, hyperopt.Minibatches(x, y), hyperopt.Minibatches(x_val, y_val)
    )
    with pytest.raises(ValueError, match=r"\['forgotten'\] is used by neither"):
        loop.step(state)
    assert state.step == 0 and torch.equal(state.params["w"], params["w"])


def test_bad_configuration_is_refused_before_computing():
    with pytest.raises(TypeError, match="inner_optimizer: got an optimiser already built"):
        make_loop(inner=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    with pytest.raises(TypeError, match="outer_optimizer: expected an optimiser"):
        make_loop(outer=0.1)
    with pytest.raises(ValueError, match="inner_steps"):
        make_loop(inner_steps=0)
    with pytest.raises(TypeError, match="train_loss"):
        make_loop(train_loss="loss")
    with pytest.raises(TypeError, match="adjoint: expected"):
        make_loop(adjoint=implicitfn.CG())
    with pytest.raises(TypeError, match="GaussNewton"):
        make_loop(adjoint=implicitfn.ImplicitAdjoint(curvature=implicitfn.GaussNewton()))
    with pytest.raises(ValueError, match="val_metrics: 'loss'"):
        make_loop(val_metrics={"loss": val_loss})
    with pytest.raises(TypeError, match="train_metrics: expected a dict"):
        make_loop(train_metrics=[val_loss])
    loop = make_loop(inner=lambda tensors: torch.optim.LBFGS(tensors))
    with pytest.raises(TypeError, match="LBFGS needs a closure"):
        init_state(loop)
    loop = make_loop()
    with pytest.raises(TypeError, match="params"):
        loop.init({"w": torch.zeros(3, dtype=torch.int64)}, torch.zeros(()), [1], [1])
    with pytest.raises(TypeError, match="train_batches: expected an iterable"):
        loop.init(torch.zeros(3), torch.zeros(()), 3, [1])
    with pytest.raises(ValueError, match="outer_steps"):
        loop.run(init_state(loop), outer_steps=-1)


def test_non_scalar_loss_is_named():
    loop = make_loop(train_loss=lambda p, h, x, y: (x @ p["w"] - y) ** 2 + h["decay"])
    with pytest.raises(ValueError, match="train_loss: must return a floating-point scalar"):
        loop.step(init_state(loop))


def test_resume_checks():
    loop = make_loop()
    state = init_state(loop)
    saved = state.state_dict()
    x, y, x_val, y_val = ridge_problem()
    wider = loop.init(
        TensorDict(w=torch.zeros(7, dtype=torch.float64)),
        TensorDict(decay=torch.zeros((), dtype=torch.float64)),
        hyperopt.Minibatches(x, y),
        hyperopt.Minibatches(x_val, y_val),
    )
    with pytest.raises(ValueError, match="do not match"):
        wider.load_state_dict(saved)
    with pytest.raises(ValueError, match="not a checkpoint"):
        state.load_state_dict({"step": 3})
    plain = loop.init(
        TensorDict(w=torch.zeros(6, dtype=torch.float64)),
        TensorDict(decay=torch.zeros((), dtype=torch.float64)),
        [(x, y)],
        [(x_val, y_val)],
    )
    with pytest.warns(UserWarning, match="train_batches and val_batches cannot save"):
        plain.state_dict()
    with pytest.raises(
        ValueError, match="train_batches: the checkpoint holds an iterator position"
    ):
        plain.load_state_dict(saved)


def test_progress_bar_shows_validation_metrics(capsys):
    loop = make_loop()
    loop.run(init_state(loop), outer_steps=2, progress=True)
    shown = capsys.readouterr().err
    assert "hyper steps" in shown and "val_mse" in shown and "solve=successful" in shown


def test_tolerance_schedule_sets_each_backward_solve():
    """Each hyper step's solve runs at the scheduled tolerance (recorded), loose ones take fewer
    steps, and the schedule shares the adjoint's warm start."""
    schedule = hyperopt.GeometricTolerance(start=0.3, end=1e-8, steps=4)
    adjoint = implicitfn.ImplicitAdjoint(
        solver=implicitfn.CG(max_steps=50, rtol=1e-8), inner_rtol=None, warm_start=True
    )
    loop = make_loop(adjoint=adjoint, tolerance_schedule=schedule)
    state = init_state(loop)
    history = loop.run(state, outer_steps=5, progress=False)
    assert history["solve_rtol"] == pytest.approx([schedule(k) for k in range(1, 6)])
    assert history["solve_rtol"][0] == 0.3 and history["solve_rtol"][-1] == 1e-8
    assert all(
        r <= t for r, t in zip(history["relative_residual"], history["solve_rtol"], strict=True)
    )
    assert history["solve_steps"][0] < history["solve_steps"][3]
    assert adjoint._state.initial("reverse") is not None  # the shared warm-start memory


def test_tolerance_schedule_needs_a_given_solver():
    with pytest.raises(TypeError, match="tolerance_schedule"):
        make_loop(adjoint=implicitfn.ImplicitAdjoint(), tolerance_schedule=lambda step: 0.1)
    with pytest.raises(TypeError, match="tolerance_schedule"):
        make_loop(tolerance_schedule=0.1)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"start": 0.0, "end": 0.0, "steps": 3}, "start"),
        ({"start": 1e-3, "end": 1e-1, "steps": 3}, "end"),
        ({"start": 1e-1, "end": 1e-3, "steps": 0}, "steps"),
    ],
)
def test_geometric_tolerance_is_validated(options, match):
    with pytest.raises(ValueError, match=match):
        hyperopt.GeometricTolerance(**options)


def test_with_rtol_shares_state_and_refuses_without_a_solver():
    adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.CG(rtol=1e-2), warm_start=True)
    loose = adjoint.with_rtol(0.5)
    assert loose.solver.rtol == 0.5 and adjoint.solver.rtol == 1e-2
    assert loose._state is adjoint._state
    with pytest.raises(ValueError, match="with_rtol"):
        implicitfn.ImplicitAdjoint().with_rtol(0.1)
