"""compile=...: compiled hypergradients equal eager ones, compile once, and fall back with one warning.

Compiling is slow on a small CPU, so the problems are tiny, the loss functions live at module
level (the compiled artefacts are cached by function identity and shared between tests), and
the solver-by-dtype matrix uses the `aot_eager` backend (the same traced graph, no code
generation). The default inductor backend is checked on CG in both dtypes, through both entry
points, and for recompilation.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_trees_close
from torch._dynamo.utils import counters

import implicitfn
from implicitfn import _compile

FIXED_STEP_SOLVERS = {
    "cg": implicitfn.CG(max_steps=3, rtol=None),
    "neumann": implicitfn.Neumann(steps=4, alpha=0.3),
    "fixed-point": implicitfn.FixedPoint(max_steps=4, rtol=None, alpha=0.3),
    "identity": implicitfn.Identity(),
    "dense": implicitfn.Dense(),
}
# Compiled products with the solver's loop in Python: one product artefact serves all three.
PRODUCT_SOLVERS = {
    "cg-rtol": implicitfn.CG(rtol=1e-10),
    "minres": implicitfn.MINRES(rtol=1e-10),
    "gmres": implicitfn.GMRES(rtol=1e-10),
}
AOT_EAGER = implicitfn.Compile(backend="aot_eager")
DTYPES = [torch.float64, torch.float32]


def train_loss(p, h, x, y):
    residual = x @ p["w"] + p["b"] - y
    penalty = (h["decay"].exp() * p["w"] ** 2).sum() + h["bias_decay"].exp() * p["b"] ** 2
    return 0.5 * (residual**2).mean() + 0.5 * penalty


def outer_loss(p, h, x, y):
    return 0.5 * ((x @ p["w"] + p["b"] - y) ** 2).mean()


CONDITION = implicitfn.stationarity(train_loss)


def ridge(p, h, x, y):
    """The exact inner solution (normal equations of the augmented design)."""
    design = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    decay = torch.cat([h["decay"].exp(), h["bias_decay"].exp().reshape(1)])
    matrix = design.T @ design / len(y) + torch.diag(decay)
    solution = torch.linalg.solve(matrix, design.T @ y / len(y))
    return {"w": solution[:-1], "b": solution[-1]}


def problem(dtype, shift=0.0):
    gen = torch.Generator().manual_seed(0)
    x, x_val = (torch.randn(20, 3, generator=gen, dtype=dtype) for _ in range(2))
    y, y_val = (torch.randn(20, generator=gen, dtype=dtype) for _ in range(2))
    hparams = {
        "decay": torch.linspace(-1.0, 0.5, 3, dtype=dtype) + shift,
        "bias_decay": torch.tensor(-0.5 + shift, dtype=dtype),
    }
    return ridge(None, hparams, x, y), hparams, (x, y), (x_val, y_val)


def hypergradient(dtype, solver, compile, shift=0.0):
    params, hparams, inner, outer = problem(dtype, shift)
    return implicitfn.hypergradient(
        CONDITION,
        outer_loss,
        params,
        hparams,
        inner_args=inner,
        outer_args=outer,
        solver=solver,
        compile=compile,
    )


def decorated(solver, compile, **options):
    return implicitfn.implicit_diff(CONDITION, solver=solver, compile=compile, **options)(ridge)


def backward_hypergradient(function, dtype, shift=0.0):
    params, hparams, inner, outer = problem(dtype, shift)
    hparams = {k: v.clone().requires_grad_(True) for k, v in hparams.items()}
    outer_loss(function(params, hparams, *inner), hparams, *outer).backward()
    return {k: v.grad for k, v in hparams.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", [*FIXED_STEP_SOLVERS, *PRODUCT_SOLVERS])
def test_compiled_equals_eager_for_every_solver(name, dtype):
    solver = {**FIXED_STEP_SOLVERS, **PRODUCT_SOLVERS}[name]
    expected, expected_info = hypergradient(dtype, solver, False)
    actual, info = hypergradient(dtype, solver, AOT_EAGER)
    assert_trees_close(actual, expected, dtype=dtype)
    assert int(info.num_steps) == int(expected_info.num_steps)
    assert bool(info.converged) and info.solver == expected_info.solver
    assert _compile.statistics()["fallbacks"] == 0


COMPOSITE = implicitfn.stationarity(
    implicitfn.CompositeLoss(
        predict=lambda p, h, x, y: x @ p["w"] + p["b"],
        output_loss=lambda out, h, x, y: 0.5 * ((out - y) ** 2).mean(),
        penalty=lambda p, h, x, y: (
            0.5 * (h["decay"].exp() * p["w"] ** 2).sum() + 0.5 * h["bias_decay"].exp() * p["b"] ** 2
        ),
    )
)


@pytest.mark.parametrize("name", ["cg", "cg-rtol"])
def test_gauss_newton_equals_eager(name):
    """Gauss-Newton products are compiled one call each (no stored linearisation to reuse)."""
    solver = {**FIXED_STEP_SOLVERS, **PRODUCT_SOLVERS}[name]
    params, hparams, inner, outer = problem(torch.float64)

    def run(compile):
        return implicitfn.hypergradient(
            COMPOSITE, outer_loss, params, hparams, inner_args=inner, outer_args=outer,
            solver=solver, curvature=implicitfn.GaussNewton(), compile=compile,
        )[0]  # fmt: skip

    assert_trees_close(run(AOT_EAGER), run(False))
    assert _compile.statistics()["fallbacks"] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inductor_equals_eager_in_both_entry_points(dtype):
    solver = FIXED_STEP_SOLVERS["cg"]
    expected, _ = hypergradient(dtype, solver, False)
    before = _compile.statistics()["compiled"]
    actual, info = hypergradient(dtype, solver, True)  # one graph: the whole hypergradient
    assert_trees_close(actual, expected, dtype=dtype)
    by_backward = backward_hypergradient(decorated(solver, True), dtype)  # one: solve + B^T v
    assert_trees_close(by_backward, expected, dtype=dtype)
    assert _compile.statistics()["compiled"] - before <= 2
    assert _compile.statistics()["fallbacks"] == 0


def test_no_recompilation_across_outer_steps():
    solver, dtype = FIXED_STEP_SOLVERS["cg"], torch.float64
    compiled_fn = decorated(solver, True)
    hypergradient(dtype, solver, True)  # compiled already, or now
    backward_hypergradient(compiled_fn, dtype)
    compiled, graphs = _compile.statistics()["compiled"], counters["stats"]["unique_graphs"]
    for step in range(1, 6):
        shift = 0.1 * step  # new hyperparameters, so a new inner solution and right-hand side
        expected, _ = hypergradient(dtype, solver, False, shift)
        assert_trees_close(hypergradient(dtype, solver, True, shift)[0], expected)
        assert_trees_close(backward_hypergradient(compiled_fn, dtype, shift), expected)
    assert _compile.statistics()["compiled"] == compiled
    assert counters["stats"]["unique_graphs"] == graphs


def test_warm_start_matches_eager():
    solver, dtype = FIXED_STEP_SOLVERS["cg"], torch.float64
    compiled_fn = decorated(solver, AOT_EAGER, warm_start=True)
    eager_fn = decorated(solver, False, warm_start=True)
    for shift in (0.0, 0.1, 0.2):  # the first solve starts from zero, the others warm
        assert_trees_close(
            backward_hypergradient(compiled_fn, dtype, shift),
            backward_hypergradient(eager_fn, dtype, shift),
        )


def contraction(w, lam, a, b):
    return torch.tanh(a @ w + b @ lam)


CONTRACTION = implicitfn.fixed_point(contraction)


def test_non_symmetric_condition_both_transposes():
    """A fixed point: the reverse pass solves with A^T (fused with B^T v), a plain solve with A."""
    from implicitfn._implicit import _Backward

    gen = torch.Generator().manual_seed(0)
    a = 0.3 * torch.randn(5, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    lam, rhs = torch.randn(3, generator=gen, dtype=torch.float64), torch.ones(5).double()
    w = torch.zeros(5, dtype=torch.float64)
    for _ in range(100):
        w = contraction(w, lam, a, b)
    solver, condition = implicitfn.FixedPoint(max_steps=8, rtol=None), CONTRACTION

    def backward(compile):
        return _Backward(
            condition, solver, implicitfn.Hessian(), 0.0, "raise", None, compile=compile
        )

    for transpose in (False, True):
        expected = backward(None).solve(w, lam, (a, b), rhs, transpose=transpose)
        actual = backward(AOT_EAGER).solve(w, lam, (a, b), rhs, transpose=transpose)
        assert_trees_close(actual, expected)
    selected = [True, False, False]
    expected = backward(None).reverse(w, lam, (a, b), rhs, selected)
    actual = backward(AOT_EAGER).reverse(w, lam, (a, b), rhs, selected)
    assert actual[1:] == [None, None]
    assert_trees_close(actual[0], expected[0])
    assert _compile.statistics()["fallbacks"] == 0


def branching_loss(p, h, x, y):
    """Python control flow on a tensor value: dynamo cannot capture it in one graph."""
    if float(p["w"].detach().sum()) > 1e6:
        return 0.0 * train_loss(p, h, x, y)
    return train_loss(p, h, x, y)


def test_uncompilable_loss_falls_back_with_one_warning():
    solver, dtype = FIXED_STEP_SOLVERS["cg"], torch.float64
    params, hparams, inner, outer = problem(dtype)
    condition = implicitfn.stationarity(branching_loss)

    def run(compile):
        return implicitfn.hypergradient(
            condition,
            outer_loss,
            params,
            hparams,
            inner_args=inner,
            outer_args=outer,
            solver=solver,
            compile=compile,
        )[0]

    expected = run(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [run(AOT_EAGER) for _ in range(3)]
    messages = [w for w in caught if issubclass(w.category, implicitfn.CompileWarning)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert "runs eagerly" in str(messages[0].message)
    for result in results:
        assert_trees_close(result, expected)


def test_missing_cxx_compiler_falls_back_with_one_warning():
    import torch._inductor.config as inductor_config

    solver, dtype = implicitfn.Identity(), torch.float64
    expected, _ = hypergradient(dtype, solver, False)
    options = implicitfn.Compile(mode="max-autotune-no-cudagraphs")  # artefacts of its own
    patch = {
        "cpp.cxx": ("/nonexistent/c++",),
        "fx_graph_cache": False,
        "autotune_local_cache": False,
    }
    with inductor_config.patch(patch), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [hypergradient(dtype, solver, options)[0] for _ in range(2)]
    messages = [w for w in caught if issubclass(w.category, implicitfn.CompileWarning)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    for result in results:
        assert_trees_close(result, expected)


def test_inside_torch_func_transforms_it_runs_eagerly_with_one_warning():
    solver, dtype = FIXED_STEP_SOLVERS["cg"], torch.float64
    params, hparams, inner, outer = problem(dtype)

    def validation(decay, function):
        h = {**hparams, "decay": decay}
        return outer_loss(function(params, h, *inner), h, *outer)

    expected = torch.func.grad(validation)(hparams["decay"], decorated(solver, False))
    function = decorated(solver, implicitfn.Compile(backend="eager"))
    with pytest.warns(implicitfn.CompileWarning, match="torch.func transforms"):
        actual = torch.func.grad(validation)(hparams["decay"], function)
    assert_trees_close(actual, expected)


def test_misuse_raises_before_computing():
    with pytest.raises(ValueError, match="compile: expected True, False, a mode"):
        implicitfn.implicit_diff(CONDITION, compile="fastest")
    with pytest.raises(TypeError, match="compile: expected a bool"):
        implicitfn.implicit_diff(CONDITION, compile=1)
    with pytest.raises(ValueError, match="mode: expected one of"):
        implicitfn.Compile(mode="fast")
    with pytest.raises(ValueError, match="scope: expected one of"):
        implicitfn.Compile(scope="loop")
    with pytest.raises(ValueError, match="scope='solve' needs a solver with a fixed number"):
        implicitfn.implicit_diff(
            CONDITION, solver=implicitfn.CG(rtol=1e-6), compile=implicitfn.Compile(scope="solve")
        )
    assert _compile.as_compile("reduce-overhead") == implicitfn.Compile(mode="reduce-overhead")
    assert _compile.as_compile(False) is None
