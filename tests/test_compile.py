"""compile=...: compiled hypergradients equal eager ones, compile once, and fall back with one warning.

Compiling is slow on a small CPU, so the problems are tiny, and the solver-by-dtype matrix uses
the `aot_eager` backend (the same traced graph, no code generation). The default inductor
backend is checked on CG in both dtypes, through both entry points, and for recompilation. The
compiled graphs belong to the adjoint, so each test keeps its adjoints across its calls.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_trees_close
from torch._dynamo.utils import counters

import implicitfn

FIXED_STEP_SOLVERS = {
    "cg": implicitfn.CG(max_steps=3, rtol=0),
    "neumann": implicitfn.Neumann(max_steps=4, alpha=0.3),
    "fixed-point": implicitfn.FixedPoint(max_steps=4, rtol=0, alpha=0.3),
    "identity": implicitfn.Identity(),
    "dense": implicitfn.Dense(),
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


def adjoint(solver, compile, **options):
    return implicitfn.ImplicitAdjoint(solver=solver, compile=compile, **options)


def hypergradient(dtype, chosen, shift=0.0, condition=CONDITION):
    params, hparams, inner, outer = problem(dtype, shift)
    return implicitfn.hypergradient(
        condition, outer_loss, params, hparams, inner_args=inner, outer_args=outer, adjoint=chosen
    )


def decorated(chosen):
    return implicitfn.implicit_diff(CONDITION, adjoint=chosen)(ridge)


def backward_hypergradient(function, dtype, shift=0.0):
    params, hparams, inner, outer = problem(dtype, shift)
    hparams = {k: v.clone().requires_grad_(True) for k, v in hparams.items()}
    outer_loss(function(params, hparams, *inner), hparams, *outer).backward()
    return {k: v.grad for k, v in hparams.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", [*FIXED_STEP_SOLVERS])
def test_compiled_equals_eager_for_every_solver(name, dtype):
    solver = FIXED_STEP_SOLVERS[name]
    expected, expected_info = hypergradient(dtype, adjoint(solver, False))
    compiled = adjoint(solver, AOT_EAGER)
    actual, info = hypergradient(dtype, compiled)
    assert_trees_close(actual, expected, dtype=dtype)
    assert int(info.num_steps) == int(expected_info.num_steps)
    assert info.outcome_names() == expected_info.outcome_names()
    assert not bool(info.failed) and info.solver == expected_info.solver
    assert compiled.compile_fallbacks == {} and compiled.compiled_functions.compiled == 1


COMPOSITE = implicitfn.stationarity(
    implicitfn.CompositeLoss(
        predict=lambda p, h, x, y: x @ p["w"] + p["b"],
        output_loss=lambda out, h, x, y: 0.5 * ((out - y) ** 2).mean(),
        penalty=lambda p, h, x, y: (
            0.5 * (h["decay"].exp() * p["w"] ** 2).sum() + 0.5 * h["bias_decay"].exp() * p["b"] ** 2
        ),
    )
)


def test_gauss_newton_equals_eager():
    solver, gauss_newton = FIXED_STEP_SOLVERS["cg"], implicitfn.GaussNewton()
    compiled = adjoint(solver, AOT_EAGER, curvature=gauss_newton)
    eager = adjoint(solver, False, curvature=gauss_newton)
    expected = hypergradient(torch.float64, eager, condition=COMPOSITE)[0]
    assert_trees_close(hypergradient(torch.float64, compiled, condition=COMPOSITE)[0], expected)
    assert compiled.compile_fallbacks == {}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inductor_equals_eager_in_both_entry_points(dtype):
    solver = FIXED_STEP_SOLVERS["cg"]
    expected, _ = hypergradient(dtype, adjoint(solver, False))
    compiled = adjoint(solver, True)
    actual, info = hypergradient(dtype, compiled)  # one graph: outer gradient and reverse pass
    assert_trees_close(actual, expected, dtype=dtype)
    by_backward = backward_hypergradient(decorated(compiled), dtype)  # a reverse pass of its own
    assert_trees_close(by_backward, expected, dtype=dtype)
    assert compiled.compiled_functions.compiled == 2
    assert compiled.compile_fallbacks == {}


def test_no_recompilation_across_outer_steps():
    solver, dtype = FIXED_STEP_SOLVERS["cg"], torch.float64
    compiled, eager = adjoint(solver, True), adjoint(solver, False)
    function = decorated(compiled)
    hypergradient(dtype, compiled)
    backward_hypergradient(function, dtype)
    artefacts, graphs = compiled.compiled_functions.compiled, counters["stats"]["unique_graphs"]
    for step in range(1, 6):
        shift = 0.1 * step  # new hyperparameters, so a new inner solution and right-hand side
        expected, _ = hypergradient(dtype, eager, shift)
        assert_trees_close(hypergradient(dtype, compiled, shift)[0], expected)
        assert_trees_close(backward_hypergradient(function, dtype, shift), expected)
    assert compiled.compiled_functions.compiled == artefacts
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_cache_is_bounded_and_owned_by_the_adjoint():
    solver = FIXED_STEP_SOLVERS["identity"]
    compiled = adjoint(solver, implicitfn.Compile(backend="eager", max_artefacts=1))
    for dtype in DTYPES:  # a graph per dtype
        hypergradient(dtype, compiled)
    assert len(compiled.compiled_functions) == 1 and compiled.compiled_functions.compiled == 2
    assert adjoint(solver, AOT_EAGER).compiled_functions.compiled == 0  # a new adjoint: its own


def test_warm_start_matches_eager():
    solver, dtype = FIXED_STEP_SOLVERS["cg"], torch.float64
    compiled_fn = decorated(adjoint(solver, AOT_EAGER, warm_start=True))
    eager_fn = decorated(adjoint(solver, False, warm_start=True))
    for shift in (0.0, 0.1, 0.2):  # the first solve starts from zero, the others warm
        assert_trees_close(
            backward_hypergradient(compiled_fn, dtype, shift),
            backward_hypergradient(eager_fn, dtype, shift),
        )


def contraction(w, lam, a, b):
    return torch.tanh(a @ w + b @ lam)


def test_non_symmetric_condition_reverse_pass():
    """A fixed point: the reverse pass solves with A^T, fused with B^T v, in one graph."""
    gen = torch.Generator().manual_seed(0)
    a = 0.3 * torch.randn(5, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    lam = torch.randn(3, generator=gen, dtype=torch.float64)
    w = torch.zeros(5, dtype=torch.float64)
    for _ in range(100):
        w = contraction(w, lam, a, b)
    condition = implicitfn.fixed_point(contraction)
    solver = implicitfn.FixedPoint(max_steps=8, rtol=0)
    compiled = adjoint(solver, AOT_EAGER)
    cotangent, selected = torch.ones(5, dtype=torch.float64), [True, False, False]
    expected, _ = adjoint(solver, False).reverse(condition, w, lam, (a, b), cotangent, selected)
    actual, _ = compiled.reverse(condition, w, lam, (a, b), cotangent, selected)
    assert actual[1:] == [None, None]
    assert_trees_close(actual[0], expected[0])
    assert compiled.compile_fallbacks == {}


def branching_loss(p, h, x, y):
    """Python control flow on a tensor value: dynamo cannot capture it in one graph."""
    if float(p["w"].detach().sum()) > 1e6:
        return 0.0 * train_loss(p, h, x, y)
    return train_loss(p, h, x, y)


def test_uncompilable_loss_falls_back_with_one_warning():
    solver, dtype = FIXED_STEP_SOLVERS["cg"], torch.float64
    condition = implicitfn.stationarity(branching_loss)
    expected = hypergradient(dtype, adjoint(solver, False), condition=condition)[0]
    compiled = adjoint(solver, AOT_EAGER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [hypergradient(dtype, compiled, condition=condition)[0] for _ in range(3)]
    messages = [w for w in caught if issubclass(w.category, implicitfn.CompileWarning)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert "runs eagerly" in str(messages[0].message)
    reason = compiled.compile_fallbacks["the reverse pass"]  # kept where the user can read it
    assert reason.startswith(("Unsupported", "UserError")), reason
    for result in results:
        assert_trees_close(result, expected)


def test_a_bug_is_not_swallowed_as_a_compile_failure():
    """Dynamo reports an exception in traced user code as Unsupported: the eager run that
    follows then raises the user's own exception, as it would without compile=."""

    def broken_outer(p, h, x, y):
        raise KeyError("a bug in user code")

    params, hparams, inner, outer = problem(torch.float64)
    with warnings.catch_warnings(), pytest.raises(KeyError, match="a bug in user code"):
        warnings.simplefilter("ignore", implicitfn.CompileWarning)
        implicitfn.hypergradient(
            CONDITION, broken_outer, params, hparams, inner_args=inner, outer_args=outer,
            adjoint=adjoint(FIXED_STEP_SOLVERS["cg"], AOT_EAGER),
        )  # fmt: skip


def test_missing_cxx_compiler_falls_back_with_one_warning():
    import torch._inductor.config as inductor_config

    solver, dtype = implicitfn.Identity(), torch.float64
    expected, _ = hypergradient(dtype, adjoint(solver, False))
    compiled = adjoint(solver, implicitfn.Compile(mode="max-autotune-no-cudagraphs"))
    patch = {
        "cpp.cxx": ("/nonexistent/c++",),
        "fx_graph_cache": False,
        "autotune_local_cache": False,
    }
    with inductor_config.patch(patch), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [hypergradient(dtype, compiled)[0] for _ in range(2)]
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

    expected = torch.func.grad(validation)(hparams["decay"], decorated(adjoint(solver, False)))
    function = decorated(adjoint(solver, implicitfn.Compile(backend="eager")))
    with pytest.warns(implicitfn.CompileWarning, match="torch.func transform"):
        actual = torch.func.grad(validation)(hparams["decay"], function)
    assert_trees_close(actual, expected)


def test_misuse_raises_before_computing():
    with pytest.raises(ValueError, match="compile: expected True, False, a mode"):
        implicitfn.ImplicitAdjoint(compile="fastest")
    with pytest.raises(TypeError, match="compile: expected a bool"):
        implicitfn.ImplicitAdjoint(compile=1)
    with pytest.raises(ValueError, match="mode: expected one of"):
        implicitfn.Compile(mode="fast")
    with pytest.raises(ValueError, match="max_artefacts: must be >= 1"):
        implicitfn.Compile(max_artefacts=0)
    with pytest.raises(ValueError, match="compile: needs a solver that runs a fixed number"):
        implicitfn.ImplicitAdjoint(solver=implicitfn.CG(rtol=1e-6), compile=True)
    with pytest.raises(ValueError, match="cannot be combined with distributed"):
        implicitfn.ImplicitAdjoint(solver=FIXED_STEP_SOLVERS["cg"], compile=True, distributed=True)
