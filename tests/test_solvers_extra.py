"""MINRES, GMRES, Nystrom, StochasticNeumann; automatic alpha, CG preconditioning, warm start."""

import itertools

import hypothesis.strategies as st
import pytest
import torch
from helpers import assert_trees_close, assert_unchanged, clone_tree, matrix_operator, outcome
from hypothesis import given, settings
from problems import logistic_data, logistic_loss, newton_minimise, ridge_inner
from strategies import MAX_CONDITION, build_tree, spd_matrix, spd_systems, tree_structures
from tensordict import TensorDict

import implicitfn
from implicitfn import Outcome
from implicitfn.testing import ridge_hypergradient

F64 = torch.float64
SPD = ("symmetric", "positive_semidefinite")


def randn(shape, dtype):
    return torch.randn(shape, dtype=dtype)


def tree_size(structure) -> int:
    return sum(int(torch.tensor(shape).prod()) if shape else 1 for _, shape in structure[1])


def orthogonal(size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=F64))[0]


@st.composite
def indefinite_systems(draw):
    """(structure, matrix, q_neg): symmetric, |eigenvalues| in [1, cond], at least one negative;
    q_neg is the eigenvector of the most negative eigenvalue."""
    structure = draw(tree_structures())
    size = tree_size(structure)
    condition = draw(st.floats(1.0, MAX_CONDITION))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed + 1)
    magnitudes = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), size, dtype=F64)
    signs = torch.where(torch.rand(size, generator=gen, dtype=F64) < 0.5, -1.0, 1.0).to(F64)
    signs[int(torch.randint(size, (1,), generator=gen))] = -1.0
    eigenvalues = magnitudes * signs
    q = orthogonal(size, seed)
    return structure, (q * eigenvalues) @ q.T, q[:, int(torch.argmin(eigenvalues))]


@st.composite
def nonsymmetric_systems(draw):
    """(structure, matrix): U diag(s) V^T with singular values in [1, 100]; not symmetric."""
    structure = draw(tree_structures())
    size = tree_size(structure)
    seed = draw(st.integers(0, 2**16))
    singular = torch.logspace(0, draw(st.floats(0.0, 2.0)), size, dtype=F64)
    return structure, (orthogonal(size, seed) * singular) @ orthogonal(size, seed + 1).T


def exact(matrix, rhs):
    flat, unravel = implicitfn.tree_ravel(rhs)
    return unravel(torch.linalg.solve(matrix, flat))


def close_to_exact(solution, matrix, rhs, tol):
    expected = exact(matrix, rhs)
    scale = float(implicitfn.tree_ravel(expected)[0].abs().max())
    assert_trees_close(solution, expected, rtol=tol, atol=tol * scale)


# --- agreement with torch.linalg.solve -----------------------------------------------------


@given(system=spd_systems())
def test_minres_and_gmres_match_linalg_solve_on_spd(system):
    structure, matrix, _ = system
    rhs = build_tree(structure, randn)
    before = clone_tree(rhs)
    n = matrix.shape[0]
    operator = matrix_operator(matrix, rhs, tags=SPD)
    for solver in (
        implicitfn.MINRES(max_steps=10 * n, rtol=1e-12),
        implicitfn.GMRES(max_steps=10 * n, restart=n, rtol=1e-12),
    ):
        solution, info = solver.solve(operator, rhs)
        assert bool(info.successful), info
        close_to_exact(solution, matrix, rhs, 1e-7)
    assert_unchanged(before, rhs)


@given(system=indefinite_systems())
def test_minres_solves_indefinite_systems_where_cg_reports_failure(system):
    structure, matrix, q_neg = system
    _, unravel = implicitfn.tree_ravel(build_tree(structure, randn))
    # b has negative curvature b^T A b < 0, so CG breaks down at its first step.
    rhs = unravel(q_neg + 1e-3 * torch.randn(matrix.shape[0], dtype=F64) / matrix.shape[0])
    operator = matrix_operator(matrix, rhs)
    _, cg_info = implicitfn.CG(max_steps=10 * matrix.shape[0]).solve(operator, rhs)
    assert outcome(cg_info) is Outcome.NEGATIVE_CURVATURE
    solution, info = implicitfn.MINRES(max_steps=10 * matrix.shape[0], rtol=1e-12).solve(
        operator, rhs
    )
    assert bool(info.successful), info
    close_to_exact(solution, matrix, rhs, 1e-7)
    true_residual = (matrix @ implicitfn.tree_ravel(solution)[0]) - implicitfn.tree_ravel(rhs)[0]
    assert float(true_residual.norm()) <= 1e-9 * float(info.rhs_norm) * MAX_CONDITION


@given(system=nonsymmetric_systems())
def test_gmres_matches_linalg_solve_on_nonsymmetric(system):
    structure, matrix = system
    rhs = build_tree(structure, randn)
    operator = matrix_operator(matrix, rhs, tags=())
    n = matrix.shape[0]
    with pytest.raises(ValueError, match="symmetric"):
        implicitfn.MINRES().solve(operator, rhs)
    solution, info = implicitfn.GMRES(max_steps=3 * n, restart=n, rtol=1e-12).solve(operator, rhs)
    assert bool(info.successful), info
    assert int(info.num_steps) <= n + 2
    close_to_exact(solution, matrix, rhs, 1e-7)


def test_restarted_gmres_beats_fixed_point_on_a_non_symmetric_contraction():
    """A = I - J, J = V diag(lam) V^-1 with lam in [-0.95, 0.95]: Richardson contracts by 0.95 a
    step, GMRES(5) adapts to the spread of the spectrum."""
    n = 60
    gen = torch.Generator().manual_seed(0)
    v = torch.eye(n, dtype=F64) + 0.3 * torch.randn(n, n, generator=gen, dtype=F64) / n**0.5
    j = v @ torch.diag(torch.linspace(-0.95, 0.95, n, dtype=F64)) @ torch.linalg.inv(v)
    matrix = torch.eye(n, dtype=F64) - j
    rhs = torch.randn(n, generator=gen, dtype=F64)
    operator = matrix_operator(matrix, rhs, tags=())
    _, fp = implicitfn.FixedPoint(max_steps=100, rtol=1e-8).solve(operator, rhs)
    solution, info = implicitfn.GMRES(max_steps=100, restart=5, rtol=1e-8).solve(operator, rhs)
    assert outcome(fp) is Outcome.MAX_STEPS_REACHED and bool(fp.failed)
    assert bool(info.successful), info
    # The residual it reports is the measured one, not its recursive estimate.
    true = float(torch.linalg.vector_norm(rhs - matrix @ solution))
    assert true == pytest.approx(float(info.residual_norm), rel=1e-12, abs=1e-15)
    assert true <= 1e-8 * float(rhs.norm()) * 1.01


def test_gmres_reports_stagnation_as_a_breakdown():
    """A cyclic shift: GMRES(m) with m < n makes no progress at all from b = e_1."""
    n = 8
    matrix = torch.roll(torch.eye(n, dtype=F64), 1, dims=0)
    rhs = torch.zeros(n, dtype=F64)
    rhs[0] = 1.0
    _, info = implicitfn.GMRES(max_steps=40, restart=3).solve(matrix_operator(matrix, rhs, ()), rhs)
    # A cycle without progress would repeat itself: it stops after the first.
    assert outcome(info) is Outcome.BREAKDOWN and int(info.num_steps) == 3
    assert float(info.residual_norm) == pytest.approx(1.0)


# --- Nystrom -------------------------------------------------------------------------------


@settings(max_examples=15)
@given(
    system=spd_systems(), sketch=st.sampled_from(["gaussian", "columns"]), seed=st.integers(0, 99)
)
def test_nystrom_with_full_rank_equals_the_damped_exact_solve(system, sketch, seed):
    structure, matrix, _ = system
    rhs = build_tree(structure, randn)
    n = matrix.shape[0]
    damping = 0.1
    solver = implicitfn.Nystrom(rank=n + 3, damping=damping, sketch=sketch, seed=seed)
    solution, info = solver.solve(matrix_operator(matrix, rhs, tags=SPD), rhs)
    assert int(info.num_steps) == n  # the rank is clipped to the dimension
    close_to_exact(solution, matrix + damping * torch.eye(n, dtype=F64), rhs, 1e-7)


@pytest.mark.parametrize("sketch", ["gaussian", "columns"])
def test_nystrom_is_exact_for_a_curvature_of_rank_at_most_r(sketch):
    """A of rank 6 in dimension 80: a rank-10 sketch recovers it, so x = (A + rho I)^-1 b."""
    eigenvalues = torch.zeros(80, dtype=F64)
    eigenvalues[:6] = torch.logspace(-1, 2, 6, dtype=F64)
    q = orthogonal(80, 0)
    matrix = (q * eigenvalues) @ q.T
    rhs = torch.randn(80, dtype=F64)
    operator = matrix_operator(matrix, rhs, tags=SPD)
    solution, info = implicitfn.Nystrom(rank=10, damping=0.5, sketch=sketch).solve(operator, rhs)
    # A rank budget and no tolerance: it ran what was asked for.
    assert outcome(info) is Outcome.MAX_STEPS_REACHED and not bool(info.failed)
    assert int(info.num_steps) == 10
    expected = torch.linalg.solve(matrix + 0.5 * torch.eye(80, dtype=F64), rhs)
    torch.testing.assert_close(solution, expected, rtol=1e-8, atol=1e-10)


def test_nystrom_reports_a_damping_far_below_the_missed_eigenvalues():
    matrix = torch.diag(torch.logspace(0, 2, 30, dtype=F64))
    rhs = torch.ones(30, dtype=F64)
    _, info = implicitfn.Nystrom(rank=5, damping=1e-4).solve(matrix_operator(matrix, rhs, SPD), rhs)
    assert outcome(info) is Outcome.DIVERGED and bool(info.failed)
    assert float(info.residual_norm) > float(info.rhs_norm)


def test_nystrom_is_reproducible_and_depends_on_the_seed():
    matrix = spd_matrix(20, 100.0, 3)
    rhs = torch.randn(20, dtype=F64)
    operator = matrix_operator(matrix, rhs, tags=SPD)
    first, _ = implicitfn.Nystrom(rank=5, seed=1).solve(operator, rhs)
    again, _ = implicitfn.Nystrom(rank=5, seed=1).solve(operator, rhs)
    other, _ = implicitfn.Nystrom(rank=5, seed=2).solve(operator, rhs)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


# --- automatic step size -------------------------------------------------------------------


@given(system=spd_systems(), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_automatic_alpha_never_diverges_on_spd(system, scale):
    structure, matrix, _ = system
    matrix = scale * matrix
    rhs = build_tree(structure, randn)
    operator = matrix_operator(matrix, rhs, tags=SPD)
    lam_max = float(torch.linalg.eigvalsh(matrix).max())
    _, info = implicitfn.Neumann(max_steps=30, alpha="auto").solve(operator, rhs)
    assert not bool(info.failed), info
    assert int(info.num_steps) == 30 + 10
    # Every component shrinks: the residual is at most |b| (and so is each later one).
    assert float(info.residual_norm) <= float(info.rhs_norm) * (1 + 1e-9)
    _, info = implicitfn.FixedPoint(max_steps=30, alpha="auto", rtol=0).solve(operator, rhs)
    assert not bool(info.failed), info
    assert float(info.residual_norm) <= float(info.rhs_norm) * (1 + 1e-9)
    # The same problem with the hand-set alpha = 1 diverges whenever lambda_max > 2.
    if lam_max > 2.2:
        _, bad = implicitfn.Neumann(max_steps=30, alpha=1.0).solve(operator, rhs)
        assert outcome(bad) in (Outcome.DIVERGED, Outcome.NONFINITE)


def test_automatic_alpha_converges_where_a_large_fixed_alpha_diverges():
    matrix = spd_matrix(10, 50.0, 0) * 40.0  # lambda_max = 2000
    rhs = torch.randn(10, dtype=F64)
    operator = matrix_operator(matrix, rhs)
    _, diverged = implicitfn.Neumann(max_steps=100, alpha=0.01).solve(operator, rhs)
    assert outcome(diverged) is Outcome.DIVERGED
    solution, info = implicitfn.Neumann(max_steps=2000, alpha="auto").solve(operator, rhs)
    assert not bool(info.failed)
    torch.testing.assert_close(solution, torch.linalg.solve(matrix, rhs), rtol=1e-6, atol=1e-9)
    solution, info = implicitfn.FixedPoint(max_steps=2000, alpha="auto", rtol=1e-10).solve(
        operator, rhs
    )
    assert bool(info.successful)
    torch.testing.assert_close(solution, torch.linalg.solve(matrix, rhs), rtol=1e-6, atol=1e-9)


# --- CG preconditioning --------------------------------------------------------------------


def badly_scaled(n=100, seed=0):
    """D^(1/2) S D^(1/2): S well conditioned (10), D spanning four orders of magnitude."""
    root = torch.logspace(0, 2, n, dtype=F64)
    return root[:, None] * spd_matrix(n, 10.0, seed) * root[None, :]


def test_jacobi_preconditioning_reduces_cg_steps_on_a_badly_scaled_problem():
    matrix = badly_scaled()
    rhs = torch.randn(100, dtype=F64)
    before = rhs.clone()
    operator = matrix_operator(matrix, rhs, tags=SPD)
    expected = torch.linalg.solve(matrix, rhs)
    plain_x, plain = implicitfn.CG(max_steps=1000, rtol=1e-10).solve(operator, rhs)
    jacobi_x, jacobi = implicitfn.CG(
        max_steps=1000, rtol=1e-10, preconditioner="jacobi", probes=20
    ).solve(operator, rhs)
    diagonal = torch.diagonal(matrix)
    exact_x, exact_diag = implicitfn.CG(
        max_steps=1000, rtol=1e-10, preconditioner=lambda r: r / diagonal
    ).solve(operator, rhs)
    for x, info in ((plain_x, plain), (jacobi_x, jacobi), (exact_x, exact_diag)):
        assert bool(info.successful), info
        torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-8)
    # Total products (the 20 probes included) fall by more than half.
    assert int(jacobi.num_steps) < 0.5 * int(plain.num_steps)
    assert int(exact_diag.num_steps) < 0.3 * int(plain.num_steps)
    assert torch.equal(rhs, before)


def test_jacobi_is_exact_on_a_diagonal_operator_with_one_probe():
    matrix = torch.diag(torch.logspace(0, 6, 40, dtype=F64))
    rhs = torch.randn(40, dtype=F64)
    x, info = implicitfn.CG(preconditioner="jacobi", probes=1).solve(
        matrix_operator(matrix, rhs, SPD), rhs
    )
    assert int(info.num_steps) == 2 and bool(info.successful)
    torch.testing.assert_close(x, rhs / torch.diagonal(matrix))


def test_an_indefinite_preconditioner_is_reported_as_a_breakdown():
    matrix = spd_matrix(6, 10.0, 0)
    rhs = torch.randn(6, dtype=F64)
    _, info = implicitfn.CG(preconditioner=lambda r: -r).solve(
        matrix_operator(matrix, rhs, SPD), rhs
    )
    assert outcome(info) is Outcome.BREAKDOWN


def test_a_preconditioner_returning_another_key_order_or_device_is_told_how_to_build_it():
    template = TensorDict(w=torch.zeros(3, dtype=F64), b=torch.zeros(2, dtype=F64), device="cpu")
    matrix = spd_matrix(5, 10.0, 1)
    operator = matrix_operator(matrix, template, tags=SPD)
    rhs = template.apply(lambda t: torch.ones_like(t))
    swapped = implicitfn.CG(preconditioner=lambda r: TensorDict(b=r["b"], w=r["w"], device="cpu"))
    no_device = implicitfn.CG(preconditioner=lambda r: TensorDict(w=r["w"], b=r["b"]))
    with pytest.raises(ValueError, match=r"does not match.*in the same order\."):
        swapped.solve(operator, rhs)
    with pytest.raises(ValueError, match=r"not in a tree built like r.*r\.apply"):
        no_device.solve(operator, rhs)
    rebuilt = implicitfn.CG(
        rtol=1e-10, preconditioner=lambda r: TensorDict(w=r["w"], b=r["b"], device=r.device)
    )
    x, info = rebuilt.solve(operator, rhs)
    assert bool(info.successful)
    assert_trees_close(operator.mv(x), rhs, rtol=1e-8, atol=1e-8)


# --- vmap ----------------------------------------------------------------------------------


def vmap_solvers(batches):
    return [
        implicitfn.MINRES(rtol=1e-10),
        implicitfn.GMRES(restart=4, rtol=1e-10),
        implicitfn.Nystrom(rank=5, damping=10.0),
        implicitfn.Nystrom(rank=5, damping=10.0, sketch="columns"),
        implicitfn.CG(rtol=1e-10, preconditioner="jacobi", probes=3),
        implicitfn.Neumann(max_steps=40, alpha="auto"),
        implicitfn.FixedPoint(max_steps=1000, alpha="auto", rtol=1e-8),
        implicitfn.StochasticNeumann(batches, max_steps=30),
    ]


def test_vmap_over_right_hand_sides_equals_a_loop():
    template = TensorDict(
        {"a": torch.zeros(3, dtype=F64), "b": {"c": torch.zeros(2, 2, dtype=F64)}}
    )
    matrix = spd_matrix(7, 30.0, 4)
    operator = matrix_operator(matrix, template, tags=SPD)
    _, unravel = implicitfn.tree_ravel(template)
    # Solves that stop after different numbers of steps, including b = 0 and an eigenvector.
    vectors = [
        torch.randn(7, dtype=F64),
        torch.linalg.eigh(matrix)[1][:, 3],
        torch.zeros(7, dtype=F64),
    ]
    rhs = torch.stack([implicitfn.tree_ravel(unravel(v))[0] for v in vectors])
    # Curvature "batches": the same matrix scaled by 0.9 and 1.1.
    resampling = implicitfn.ResamplingOperator(
        operator, lambda s: matrix_operator(s * matrix, template, tags=SPD)
    )
    for solver in vmap_solvers([0.9, 1.1]):
        op = resampling if isinstance(solver, implicitfn.StochasticNeumann) else operator

        def solve(flat, solver=solver, op=op):
            x, info = solver.solve(op, unravel(flat))
            return implicitfn.tree_ravel(x)[0], info

        batched_x, batched_info = torch.func.vmap(solve)(rhs)
        for i, flat in enumerate(rhs):
            x, info = solve(flat)
            torch.testing.assert_close(batched_x[i], x, rtol=1e-9, atol=1e-12)
            assert int(batched_info.outcome[i]) == int(info.outcome), solver
            assert int(batched_info.num_steps[i]) == int(info.num_steps), solver
            torch.testing.assert_close(
                batched_info.residual_norm[i], info.residual_norm, rtol=1e-6, atol=1e-9
            )
        assert not bool(batched_info.failed.any()), (solver, batched_info)


def test_vmap_over_a_batch_of_operators_equals_a_loop():
    matrices = torch.stack([spd_matrix(6, c, i) for i, c in enumerate((2.0, 50.0, 900.0))])
    rhs = torch.randn(6, dtype=F64)

    def solve(matrix, solver):
        return solver.solve(matrix_operator(matrix, rhs, tags=SPD), rhs)

    for solver in (
        implicitfn.MINRES(rtol=1e-11),
        implicitfn.GMRES(max_steps=1000, restart=4, rtol=1e-11),
        implicitfn.Neumann(max_steps=50, alpha="auto"),
        implicitfn.FixedPoint(max_steps=300, alpha="auto", rtol=0),
        implicitfn.CG(rtol=1e-11, preconditioner="jacobi", probes=4),
        implicitfn.Nystrom(rank=4),
    ):
        xs, infos = torch.func.vmap(lambda m, s=solver: solve(m, s))(matrices)
        for i, matrix in enumerate(matrices):
            x, info = solve(matrix, solver)
            torch.testing.assert_close(xs[i], x, rtol=1e-9, atol=1e-12)
            # Batched products round differently: a residual at the tolerance may take one more.
            assert abs(int(infos.num_steps[i]) - int(info.num_steps)) <= 1, solver
            assert int(infos.outcome[i]) == int(info.outcome), solver


# --- stochastic Neumann --------------------------------------------------------------------


def test_stochastic_neumann_with_the_full_batch_is_neumann():
    matrix = spd_matrix(8, 20.0, 1)
    rhs = torch.randn(8, dtype=F64)
    operator = matrix_operator(matrix, rhs)
    resampling = implicitfn.ResamplingOperator(operator, lambda: operator)
    for alpha in (0.04, "auto"):
        x, info = implicitfn.StochasticNeumann([()], max_steps=25, alpha=alpha).solve(
            resampling, rhs
        )
        # Its 25 products make 26 terms; Neumann's 26th product also gives its residual.
        expected, reference = implicitfn.Neumann(max_steps=26, alpha=alpha).solve(operator, rhs)
        torch.testing.assert_close(x, expected)
        torch.testing.assert_close(info.residual_norm, reference.residual_norm)
        assert int(info.num_steps) == int(reference.num_steps) - 1
        assert torch.equal(info.outcome, reference.outcome)


def mean_ridge_loss(params, hparams, x, y):
    """Ridge with the data term averaged, so that a minibatch curvature estimates the full one."""
    return (
        0.5 * ((x @ params["w"] - y) ** 2).mean()
        + 0.5 * (hparams["penalty"] * params["w"] ** 2).sum()
    )


def test_stochastic_neumann_through_implicit_diff_beats_one_batch():
    """LiSSA through the decorator: each term on a fresh batch of 64 out of 256 samples. Its
    hypergradient is closer to the full-data one than the exact solve on a single batch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=gen, dtype=F64) * torch.tensor(
        [1.0, 0.5, 2.0, 1.0], dtype=F64
    )
    y = torch.randn(256, generator=gen, dtype=F64)
    penalty = torch.full((4,), 0.3, dtype=F64)
    batches = list(zip(x.split(64), y.split(64), strict=True))
    drawn = []

    def counted():
        for batch in itertools.cycle(batches):
            drawn.append(batch)
            yield batch

    def hypergradient(solver, x, y):
        @implicitfn.implicit_diff(
            implicitfn.stationarity(mean_ridge_loss),
            adjoint=implicitfn.ImplicitAdjoint(solver=solver),
        )
        def inner(params, hparams, x, y):
            matrix = x.T @ x / len(x) + torch.diag(hparams["penalty"])
            return {"w": torch.linalg.solve(matrix, x.T @ y / len(x))}

        leaf = penalty.clone().requires_grad_()
        inner({"w": torch.zeros(4, dtype=F64)}, {"penalty": leaf}, x, y)["w"].sum().backward()
        return leaf.grad

    stochastic = hypergradient(
        implicitfn.StochasticNeumann(counted(), max_steps=800, alpha=0.15), x, y
    )
    assert len(drawn) == 800
    expected = hypergradient(implicitfn.Dense(), x, y)
    # The exact backward solve on the first batch only (the inner solution stays the full one).
    hessian = batches[0][0].T @ batches[0][0] / 64 + torch.diag(penalty)
    w_star = torch.linalg.solve(x.T @ x / 256 + torch.diag(penalty), x.T @ y / 256)
    one_batch = -w_star * torch.linalg.solve(hessian, torch.ones(4, dtype=F64))
    error = float((stochastic - expected).norm() / expected.norm())
    assert error < 0.05
    assert error < 0.5 * float((one_batch - expected).norm() / expected.norm())


def test_stochastic_neumann_errors():
    operator = matrix_operator(spd_matrix(3, 2.0, 0), torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match="ResamplingOperator"):
        implicitfn.StochasticNeumann([()]).solve(operator, torch.ones(3, dtype=F64))
    with pytest.raises(TypeError, match="batches"):
        implicitfn.StochasticNeumann(torch.ones(3))
    with pytest.raises(TypeError, match="batches"):
        implicitfn.StochasticNeumann(3)
    resampling = implicitfn.ResamplingOperator(operator, lambda: operator)
    with pytest.raises(ValueError, match="ran out after 2"):
        implicitfn.StochasticNeumann(iter([(), ()]), max_steps=5).solve(
            resampling, torch.ones(3, dtype=F64)
        )
    with pytest.raises(ValueError, match="ran out after 0"):
        implicitfn.StochasticNeumann([], max_steps=5).solve(resampling, torch.ones(3, dtype=F64))
    # A finite list restarts: 2 batches serve 5 terms.
    _, info = implicitfn.StochasticNeumann([(), ()], max_steps=5, alpha=0.1).solve(
        resampling, torch.ones(3, dtype=F64)
    )
    assert outcome(info) is Outcome.MAX_STEPS_REACHED and not bool(info.failed)
    bad = implicitfn.ResamplingOperator(operator, lambda: "not an operator")
    with pytest.raises(TypeError, match="linearize"):
        implicitfn.StochasticNeumann([()]).solve(bad, torch.ones(3, dtype=F64))


# --- hypergradients through each solver ----------------------------------------------------


HYPERGRADIENT_SOLVERS = [
    implicitfn.MINRES(rtol=1e-12),
    implicitfn.GMRES(rtol=1e-12),
    implicitfn.Nystrom(rank=10, damping=1e-9),
    implicitfn.CG(rtol=1e-12, preconditioner="jacobi"),
    implicitfn.Neumann(max_steps=3000, alpha="auto"),
    implicitfn.FixedPoint(max_steps=5000, alpha="auto", rtol=1e-12),
]


@pytest.mark.parametrize("solver", HYPERGRADIENT_SOLVERS, ids=lambda s: type(s).__name__)
def test_ridge_hypergradient_matches_the_closed_form(solver):
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 5, generator=gen, dtype=F64), torch.randn(30, generator=gen, dtype=F64)
    x_val, y_val = (
        torch.randn(30, 5, generator=gen, dtype=F64),
        torch.randn(30, generator=gen, dtype=F64),
    )
    penalty = torch.rand(5, generator=gen, dtype=F64) + 0.5
    inner = ridge_inner(solver)
    leaf = penalty.clone().requires_grad_()
    w = inner(TensorDict({"w": torch.zeros(5, dtype=F64)}), TensorDict({"penalty": leaf}), x, y)
    (0.5 * ((x_val @ w["w"] - y_val) ** 2).sum()).backward()
    expected = ridge_hypergradient(penalty, x, y, x_val, y_val)
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("solver", HYPERGRADIENT_SOLVERS, ids=lambda s: type(s).__name__)
def test_logistic_hypergradient_matches_the_dense_solver(solver):
    x, y = logistic_data()
    x_val, y_val = logistic_data(seed=1)
    params0 = TensorDict({"w": torch.zeros(4, dtype=F64), "b": torch.zeros((), dtype=F64)})

    def hypergradient_with(linear_solver):
        @implicitfn.implicit_diff(
            implicitfn.stationarity(logistic_loss),
            adjoint=implicitfn.ImplicitAdjoint(solver=linear_solver),
        )
        def inner(params, hparams, x, y):
            return newton_minimise(logistic_loss, params, hparams, x, y)

        leaf = torch.linspace(-2, 0, 4, dtype=F64).requires_grad_()
        w = inner(params0, TensorDict({"log_penalty": leaf}), x, y)
        torch.nn.functional.binary_cross_entropy_with_logits(
            x_val @ w["w"] + w["b"], y_val
        ).backward()
        return leaf.grad

    torch.testing.assert_close(
        hypergradient_with(solver), hypergradient_with(implicitfn.Dense()), rtol=1e-6, atol=1e-10
    )


def test_fixed_point_condition_with_gmres_matches_dense():
    """w = T(w, h) = 0.8 tanh(M w) + h with |M| = 1: a contraction, non-symmetric Jacobian."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=gen, dtype=F64)
    m = m / torch.linalg.matrix_norm(m, 2)
    mapping = lambda w, h: 0.8 * torch.tanh(m @ w) + h  # noqa: E731  (a contraction)

    def solve_with(solver):
        @implicitfn.implicit_diff(
            implicitfn.fixed_point(mapping), adjoint=implicitfn.ImplicitAdjoint(solver=solver)
        )
        def inner(w, h):
            for _ in range(200):
                w = mapping(w, h)
            return w

        h = torch.linspace(-1, 1, 6, dtype=F64).requires_grad_()
        inner(torch.zeros(6, dtype=F64), h).pow(2).sum().backward()
        return h.grad

    torch.testing.assert_close(
        solve_with(implicitfn.GMRES(rtol=1e-12)), solve_with(implicitfn.Dense())
    )
    with pytest.raises(ValueError, match="symmetric"):
        implicitfn.implicit_diff(
            implicitfn.fixed_point(mapping),
            adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.MINRES()),
        )
    with pytest.raises(ValueError, match="symmetric"):
        implicitfn.implicit_diff(
            implicitfn.fixed_point(mapping),
            adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.Nystrom()),
        )


# --- warm start ----------------------------------------------------------------------------


def outer_loop(warm_start, steps=12, solver=None):
    """Gradient descent on the ridge penalties; returns (hypergradients, CG steps per solve)."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(60, 20, generator=gen, dtype=F64), torch.randn(60, generator=gen, dtype=F64)
    x_val, y_val = (
        torch.randn(60, 20, generator=gen, dtype=F64),
        torch.randn(60, generator=gen, dtype=F64),
    )
    infos = []
    inner = ridge_inner(
        solver or implicitfn.CG(rtol=1e-8), warm_start=warm_start, callback=infos.append
    )
    penalty = torch.ones(20, dtype=F64)
    gradients = []
    for _ in range(steps):
        leaf = penalty.clone().requires_grad_()
        w = inner(
            TensorDict({"w": torch.zeros(20, dtype=F64)}), TensorDict({"penalty": leaf}), x, y
        )
        (0.5 * ((x_val @ w["w"] - y_val) ** 2).sum()).backward()
        gradients.append(leaf.grad)
        penalty = penalty - 0.05 * leaf.grad
    return torch.stack(gradients), [int(info.num_steps) for info in infos]


def test_warm_start_saves_steps_and_keeps_the_answer():
    cold_grads, cold_steps = outer_loop(False)
    warm_grads, warm_steps = outer_loop(True)
    torch.testing.assert_close(warm_grads, cold_grads, rtol=1e-6, atol=1e-8)
    assert warm_steps[0] == cold_steps[0]  # nothing to start from yet
    # CG iterations only (num_steps also counts the warm start's initial-residual product).
    assert sum(steps - 1 for steps in warm_steps[1:]) < 0.8 * sum(cold_steps[1:])


def test_warm_start_is_per_adjoint_and_skips_vmap():
    infos = []

    def closed_form(params, hparams, x, y):
        matrix = x.T @ x / len(x) + torch.diag(hparams["penalty"])
        return {"w": torch.linalg.solve(matrix, x.T @ y / len(x))}

    def decorate(**options):
        adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.CG(rtol=1e-10), **options)
        condition = implicitfn.stationarity(mean_ridge_loss)
        return implicitfn.implicit_diff(condition, adjoint=adjoint)(closed_form)

    first = decorate(warm_start=True, callback=infos.append)
    second = decorate(warm_start=True, callback=infos.append)
    x, y = torch.randn(20, 3, dtype=F64), torch.randn(20, dtype=F64)

    def value(fn, penalty):
        return fn({"w": torch.zeros(3, dtype=F64)}, {"penalty": penalty}, x, y)["w"].sum()

    penalty = torch.ones(3, dtype=F64)
    torch.func.grad(lambda p: value(first, p))(penalty)
    steps_first = int(infos[-1].num_steps)
    torch.func.grad(lambda p: value(first, p))(penalty)  # same problem: starts at the answer
    assert int(infos[-1].num_steps) == 1  # the product of the initial residual only
    torch.func.grad(lambda p: value(second, p))(penalty)  # its own memory: starts from zero
    assert int(infos[-1].num_steps) == steps_first
    # Under vmap the batch neither updates nor breaks the memory, and equals a loop.
    penalties = torch.stack([penalty, 2 * penalty, 3 * penalty])
    batched = torch.func.vmap(torch.func.grad(lambda p: value(second, p)))(penalties)
    cold = decorate()
    looped = torch.stack([torch.func.grad(lambda p: value(cold, p))(p) for p in penalties])
    torch.testing.assert_close(batched, looped, rtol=1e-7, atol=1e-10)
    torch.func.grad(lambda p: value(second, p))(penalty)
    assert int(infos[-1].num_steps) == 1  # still remembers the unbatched solve


# --- bad input and edge cases --------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: implicitfn.Nystrom(rank=0), ValueError, "rank"),
        (lambda: implicitfn.Nystrom(rank=2.5), TypeError, "rank"),
        (lambda: implicitfn.Nystrom(damping=0.0), ValueError, "damping"),
        (lambda: implicitfn.Nystrom(sketch="svd"), ValueError, "sketch"),
        (lambda: implicitfn.Nystrom(seed=-1), ValueError, "seed"),
        (lambda: implicitfn.Nystrom(seed=1.0), TypeError, "seed"),
        (lambda: implicitfn.GMRES(restart=0), ValueError, "restart"),
        (lambda: implicitfn.GMRES(rtol=-1.0), ValueError, "rtol"),
        (lambda: implicitfn.MINRES(max_steps=0), ValueError, "max_steps"),
        (lambda: implicitfn.MINRES(atol=None), TypeError, "atol"),
        (lambda: implicitfn.Neumann(alpha="fast"), ValueError, "alpha"),
        (lambda: implicitfn.Neumann(alpha=-1.0), ValueError, "alpha"),
        (lambda: implicitfn.Neumann(alpha="auto", power_steps=0), ValueError, "power_steps"),
        (lambda: implicitfn.FixedPoint(alpha=0.0), ValueError, "alpha"),
        (lambda: implicitfn.CG(preconditioner="ilu"), ValueError, "preconditioner"),
        (lambda: implicitfn.CG(preconditioner=3), TypeError, "preconditioner"),
        (lambda: implicitfn.CG(preconditioner="jacobi", probes=0), ValueError, "probes"),
        (lambda: implicitfn.StochasticNeumann([()], max_steps=0), ValueError, "max_steps"),
        (lambda: implicitfn.StochasticNeumann([()], rtol=-1.0), ValueError, "rtol"),
        (lambda: implicitfn.Nystrom(atol="small"), TypeError, "atol"),
        (lambda: implicitfn.StochasticNeumann([()], alpha=0), ValueError, "alpha"),
        (lambda: implicitfn.ResamplingOperator("op", lambda: None), TypeError, "operator"),
        (
            lambda: implicitfn.ImplicitAdjoint(warm_start=1),
            TypeError,
            "warm_start",
        ),
    ],
)
def test_bad_configuration_raises_naming_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_vectors_and_operators_are_refused_before_computing():
    calls = []
    matrix = spd_matrix(3, 2.0, 0)

    def matvec(v):
        calls.append(1)
        return matrix @ v

    operator = implicitfn.FunctionLinearOperator(
        matvec, torch.zeros(3, dtype=F64), tags={"symmetric"}
    )
    for solver in (implicitfn.MINRES(), implicitfn.GMRES(), implicitfn.Nystrom()):
        with pytest.raises(ValueError, match="structure"):
            solver.solve(operator, torch.ones(4, dtype=F64))
        with pytest.raises(ValueError, match="NaN"):
            solver.solve(operator, torch.tensor([1.0, float("nan"), 0.0], dtype=F64))
    mixed = {"a": torch.zeros(2, dtype=torch.float32), "b": torch.zeros(1, dtype=F64)}
    mixed_operator = implicitfn.FunctionLinearOperator(matvec, mixed, tags={"symmetric"})
    for solver in (implicitfn.GMRES(), implicitfn.Nystrom(), implicitfn.Neumann(alpha="auto")):
        with pytest.raises(TypeError, match="share a dtype"):
            solver.solve(mixed_operator, {"a": torch.ones(2), "b": torch.ones(1, dtype=F64)})
    with pytest.raises(ValueError, match="preconditioner"):
        implicitfn.CG(preconditioner=lambda r: r[:2]).solve(operator, torch.ones(3, dtype=F64))
    assert not calls


@pytest.mark.parametrize(
    "solver",
    [
        implicitfn.Neumann(),
        implicitfn.FixedPoint(rtol=0),
        implicitfn.Nystrom(),
        implicitfn.MINRES(),
        implicitfn.GMRES(),
        implicitfn.CG(preconditioner="jacobi"),
    ],
    ids=lambda s: type(s).__name__,
)
def test_zero_right_hand_side_is_solved_exactly(solver):
    operator = matrix_operator(spd_matrix(4, 10.0, 0), torch.zeros(4, dtype=F64), tags=SPD)
    x, info = solver.solve(operator, torch.zeros(4, dtype=F64))
    assert bool(info.successful), info
    assert torch.equal(x, torch.zeros(4, dtype=F64))


def test_warm_started_solvers_use_the_initial_guess():
    matrix = spd_matrix(40, 100.0, 2)
    rhs = torch.randn(40, dtype=F64)
    answer = torch.linalg.solve(matrix, rhs)
    close = answer + 1e-6 * torch.randn(40, dtype=F64)
    before = close.clone()
    operator = matrix_operator(matrix, rhs, tags=SPD)
    for solver in (
        implicitfn.MINRES(rtol=1e-9),
        implicitfn.GMRES(rtol=1e-9),
        implicitfn.CG(rtol=1e-9, preconditioner="jacobi", probes=2),
    ):
        _, cold = solver.solve(operator, rhs)
        x, warm = solver.solve(operator, rhs, initial=close)
        assert int(warm.num_steps) < int(cold.num_steps), solver
        torch.testing.assert_close(x, answer, rtol=1e-7, atol=1e-9)
    x, info = implicitfn.Nystrom(rank=40, damping=1e-9).solve(operator, rhs, initial=close)
    assert float((x - answer).norm()) < 1e-9 and int(info.num_steps) == 41
    assert torch.equal(close, before)
