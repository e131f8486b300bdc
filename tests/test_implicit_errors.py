"""Misuse is refused before any solve; numerical failure is raised or warned, never returned."""

import pytest
import torch
from problems import ridge_inner
from tensordict import TensorDict

import implicitfn
from implicitfn.testing import ridge_loss, ridge_solution

X = torch.randn(10, 3, dtype=torch.float64)
Y = torch.randn(10, dtype=torch.float64)
PARAMS = TensorDict({"w": torch.zeros(3, dtype=torch.float64)})
HPARAMS = TensorDict({"penalty": torch.ones(3, dtype=torch.float64)})


def test_wrong_returned_structure():
    @implicitfn.implicit_diff(implicitfn.stationarity(ridge_loss))
    def inner(params, hparams, x, y):
        return TensorDict({"weights": ridge_solution(hparams["penalty"], x, y)})

    with pytest.raises(ValueError, match="same\\s+keys and shapes"):
        inner(PARAMS, HPARAMS, X, Y)

    @implicitfn.implicit_diff(implicitfn.stationarity(ridge_loss))
    def wrong_shape(params, hparams, x, y):
        return TensorDict({"w": torch.zeros(4, dtype=torch.float64)})

    with pytest.raises(ValueError, match="same\\s+keys and shapes"):
        wrong_shape(PARAMS, HPARAMS, X, Y)


def test_non_scalar_loss():
    @implicitfn.implicit_diff(implicitfn.stationarity(lambda p, h, x, y: (x @ p["w"] - y) ** 2))
    def inner(params, hparams, x, y):
        return params

    penalty = HPARAMS["penalty"].clone().requires_grad_()
    w = inner(PARAMS, TensorDict({"penalty": penalty}), X, Y)
    with pytest.raises(ValueError, match="loss: must return a scalar"):
        w["w"].sum().backward()


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        (
            [1.0, 2.0],
            r"hparams\[0\]: a Python float cannot be differentiated; pass torch.tensor\(1.0\)",
        ),
        (3.0, r"hparams: a Python float cannot be differentiated; pass torch.tensor\(3.0\)"),
        ({"penalty": 0.1}, r"hparams\['penalty'\]: a Python float"),
        ("lam", r"hparams: expected a tensor, got str"),
    ],
)
def test_hparams_of_the_wrong_type(hparams, message):
    with pytest.raises(TypeError, match=message):
        ridge_inner(implicitfn.CG())(PARAMS, hparams, X, Y)


def test_integer_hparams():
    with pytest.raises(TypeError, match=r"hparams\['penalty'\]: must be floating point"):
        ridge_inner(implicitfn.CG())(PARAMS, {"penalty": torch.ones(3, dtype=torch.int64)}, X, Y)


def test_nan_in_the_data():
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"args\[0\]: contains NaN"):
        ridge_inner(implicitfn.CG())(PARAMS, HPARAMS, bad, Y)


def test_symmetric_only_solver_on_fixed_point_condition():
    with pytest.raises(ValueError, match="CG needs a symmetric"):
        implicitfn.implicit_diff(
            implicitfn.fixed_point(lambda w, h: 0.5 * w + h),
            adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG()),
        )


class DiagonalCurvature(implicitfn.AbstractCurvature):
    """A user-written curvature: only meaningful for the Hessian of a training loss."""

    def linearize(self, loss, params, hparams, *args):
        return implicitfn.FunctionLinearOperator(lambda v: v, params, tags={"symmetric"})


def test_a_curvature_the_condition_cannot_use_is_refused_at_decoration():
    with pytest.raises(TypeError, match="CompositeLoss"):
        implicitfn.implicit_diff(
            implicitfn.stationarity(ridge_loss),
            adjoint=implicitfn.ImplicitAdjoint(curvature=implicitfn.GaussNewton()),
        )
    # Not silently ignored any more: a fixed point or root has no loss to approximate.
    for curvature in (implicitfn.GaussNewton(), DiagonalCurvature()):
        for condition in (implicitfn.fixed_point(lambda w, h: w), implicitfn.root(lambda w, h: w)):
            name = type(curvature).__name__
            with pytest.raises(
                TypeError, match=rf"curvature: {name} .* stationarity\(\.\.\.\) only"
            ):
                implicitfn.implicit_diff(
                    condition,
                    adjoint=implicitfn.ImplicitAdjoint(
                        solver=implicitfn.GMRES(), curvature=curvature
                    ),
                )


def test_a_symmetric_only_solver_is_refused_for_a_non_symmetric_condition():
    for solver in (implicitfn.CG(), implicitfn.MINRES(), implicitfn.Nystrom()):
        with pytest.raises(
            ValueError, match=f"adjoint.solver: {type(solver).__name__} needs a symmetric"
        ):
            implicitfn.implicit_diff(
                implicitfn.fixed_point(lambda w, h: 0.5 * w + h),
                adjoint=implicitfn.ImplicitAdjoint(solver=solver),
            )
    with pytest.raises(TypeError, match="adjoint: expected implicitfn.ImplicitAdjoint"):
        implicitfn.implicit_diff(implicitfn.stationarity(ridge_loss), adjoint=implicitfn.CG())


def test_bad_decorator_options():
    condition = implicitfn.stationarity(ridge_loss)
    with pytest.raises(TypeError, match="condition: expected an optimality condition"):
        implicitfn.implicit_diff(ridge_loss)
    with pytest.raises(TypeError, match="solver: expected"):
        implicitfn.implicit_diff(condition, adjoint=implicitfn.ImplicitAdjoint(solver="cg"))
    with pytest.raises(ValueError, match="on_failure"):
        implicitfn.implicit_diff(condition, adjoint=implicitfn.ImplicitAdjoint(on_failure="ignore"))
    with pytest.raises(ValueError, match="damping"):
        implicitfn.implicit_diff(condition, adjoint=implicitfn.ImplicitAdjoint(damping=-1.0))


def test_non_convergence_raises_by_default_and_warns_on_request():
    x = torch.randn(50, 30, dtype=torch.float64) * torch.logspace(-2, 1, 30, dtype=torch.float64)
    y = torch.randn(50, dtype=torch.float64)
    params = TensorDict({"w": torch.zeros(30, dtype=torch.float64)})
    penalty = torch.full((30,), 1e-3, dtype=torch.float64, requires_grad=True)
    hparams = TensorDict({"penalty": penalty})
    solver = implicitfn.CG(max_steps=2, rtol=1e-10)
    w = ridge_inner(solver)(params, hparams, x, y)
    with pytest.raises(implicitfn.ImplicitSolveError, match="outcome=max_steps_reached") as caught:
        w["w"].sum().backward()
    message = str(caught.value)  # names the condition, curvature and solver, and the fix
    assert "condition Stationarity" in message and "curvature Hessian" in message
    assert "solver CG(max_steps=2" in message and "Allow more steps" in message
    assert not bool(caught.value.info.successful) and bool(caught.value.info.failed)
    assert penalty.grad is None
    w = ridge_inner(solver, on_failure="warn")(params, hparams, x, y)
    with pytest.warns(implicitfn.ImplicitSolveWarning):
        w["w"].sum().backward()
    assert penalty.grad is not None
    # The same two steps asked for explicitly (rtol=0): reported, but not a failure.
    infos = []
    w = ridge_inner(implicitfn.CG(max_steps=2, rtol=0), callback=infos.append)(
        params, hparams, x, y
    )
    w["w"].sum().backward()
    assert infos[0].outcome_names() == ["max_steps_reached"] and not bool(infos[0].failed)


def test_non_convergence_under_vmap_still_raises():
    x = torch.randn(2, 50, 30, dtype=torch.float64) * torch.logspace(-2, 1, 30, dtype=torch.float64)
    y = torch.randn(2, 50, dtype=torch.float64)
    inner = ridge_inner(implicitfn.CG(max_steps=2, rtol=1e-10))

    def size(p, x, y):
        return inner(
            TensorDict({"w": torch.zeros(30, dtype=torch.float64)}),
            TensorDict({"penalty": p}),
            x,
            y,
        )["w"].sum()

    with pytest.raises(implicitfn.ImplicitSolveError):
        torch.func.vmap(torch.func.grad(size))(torch.full((2, 30), 1e-3, dtype=torch.float64), x, y)


def test_nan_is_never_returned_even_with_warn():
    def train_loss(params, hparams, x, y):
        # sqrt(s) at s = 0: F = dL/dw is finite, but its derivative in s is infinite.
        return ridge_loss(params, hparams, x, y) + hparams["s"].sqrt() * (params["w"] ** 2).sum()

    @implicitfn.implicit_diff(
        implicitfn.stationarity(train_loss),
        adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.Dense(), on_failure="warn"),
    )
    def inner(params, hparams, x, y):
        return TensorDict({"w": ridge_solution(hparams["penalty"], x, y)})

    s = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    w = inner(PARAMS, TensorDict({"penalty": HPARAMS["penalty"], "s": s}), X, Y)
    with pytest.raises(implicitfn.ImplicitSolveError, match=r"gradient for hparams\['s'\] is NaN"):
        w["w"].sum().backward()
    assert s.grad is None
    # NaN/Inf in the inputs themselves is named before any computing.
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    bad = TensorDict({"penalty": HPARAMS["penalty"], "s": inf})
    with pytest.raises(ValueError, match=r"hparams\['s'\]: contains NaN or Inf"):
        inner(PARAMS, bad, X, Y)
    good = TensorDict({"penalty": HPARAMS["penalty"], "s": s})
    with pytest.raises(ValueError, match=r"args\[1\]: contains NaN or Inf"):
        inner(PARAMS, good, X, Y * float("nan"))
