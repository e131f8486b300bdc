import math

import pytest
import torch
from helpers import assert_trees_close, assert_unchanged, clone_tree, matrix_operator
from hypothesis import given
from hypothesis import strategies as st
from strategies import build_tree, spd_matrix, spd_systems

import implicitfn


def randn(shape, dtype):
    return torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(system=spd_systems())
def test_cg_and_dense_match_linalg_solve(dtype, system):
    structure, matrix, _ = system
    matrix = matrix.to(dtype)
    rhs = build_tree(structure, randn, dtype)
    rhs_before = clone_tree(rhs)
    operator = matrix_operator(matrix, rhs, tags=("symmetric", "positive_semidefinite"))
    flat_rhs, unravel = implicitfn.tree_ravel(rhs)
    expected = unravel(torch.linalg.solve(matrix.double(), flat_rhs.double()).to(dtype))
    tol = {torch.float64: 1e-8, torch.float32: 2e-3}[dtype]
    for solver in (
        implicitfn.CG(max_steps=10 * flat_rhs.numel(), rtol=tol / 1e3),
        implicitfn.Dense(),
    ):
        solution, info = solver.solve(operator, rhs)
        assert bool(info.converged), info
        assert_trees_close(solution, expected, rtol=tol, atol=tol * float(flat_rhs.abs().max()))
    assert_unchanged(rhs_before, rhs)


@given(seed=st.integers(0, 1000), steps=st.integers(1, 30))
def test_neumann_converges_at_the_predicted_rate(seed, steps):
    """The residual of k Neumann steps is exactly (I - alpha A)^(k+1) b."""
    matrix = spd_matrix(6, 20.0, seed)
    lam_max = float(torch.linalg.eigvalsh(matrix).max())
    alpha = 1.0 / lam_max
    rhs = torch.randn(6, dtype=torch.float64)
    operator = matrix_operator(matrix, rhs)
    solution, info = implicitfn.Neumann(steps=steps, alpha=alpha).solve(operator, rhs)
    iteration = torch.eye(6, dtype=torch.float64) - alpha * matrix
    predicted = torch.linalg.matrix_power(iteration, steps + 1) @ rhs
    torch.testing.assert_close(rhs - matrix @ solution, predicted)
    torch.testing.assert_close(info.residual_norm, torch.linalg.vector_norm(predicted))
    spectral_radius = float(torch.linalg.eigvalsh(iteration).abs().max())
    assert float(info.residual_norm) <= spectral_radius ** (steps + 1) * float(rhs.norm()) * (
        1 + 1e-9
    )
    assert bool(info.converged)


def test_neumann_with_too_large_alpha_is_reported_not_converged():
    matrix = spd_matrix(6, 10.0, 0)
    lam_max = float(torch.linalg.eigvalsh(matrix).max())
    rhs = torch.randn(6, dtype=torch.float64)
    _, info = implicitfn.Neumann(steps=30, alpha=2.5 / lam_max).solve(
        matrix_operator(matrix, rhs), rhs
    )
    assert not bool(info.converged)
    assert float(info.residual_norm) > float(info.rhs_norm)


def test_fixed_point_solves_non_symmetric_systems():
    gen = torch.Generator().manual_seed(1)
    matrix = torch.eye(5, dtype=torch.float64) + 0.2 * torch.randn(
        5, 5, generator=gen, dtype=torch.float64
    )
    rhs = torch.randn(5, dtype=torch.float64)
    operator = matrix_operator(matrix, rhs, tags=())
    solution, info = implicitfn.FixedPoint(max_steps=500, rtol=1e-12).solve(operator, rhs)
    assert bool(info.converged)
    torch.testing.assert_close(solution, torch.linalg.solve(matrix, rhs))
    with pytest.raises(ValueError, match="symmetric"):
        implicitfn.CG().solve(operator, rhs)


def test_cg_reports_negative_curvature():
    matrix = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    rhs = torch.ones(3, dtype=torch.float64)
    _, info = implicitfn.CG().solve(matrix_operator(matrix, rhs), rhs)
    assert not bool(info.converged)


def test_cg_reports_not_converged_when_out_of_steps():
    matrix = spd_matrix(30, 1e3, 3)
    rhs = torch.randn(30, dtype=torch.float64)
    _, info = implicitfn.CG(max_steps=3, rtol=1e-10).solve(matrix_operator(matrix, rhs), rhs)
    assert not bool(info.converged)
    assert int(info.num_steps) == 3
    _, truncated = implicitfn.CG(max_steps=3, rtol=None).solve(matrix_operator(matrix, rhs), rhs)
    assert bool(truncated.converged)


def test_dense_reports_a_singular_operator():
    matrix = torch.zeros(3, 3, dtype=torch.float64)
    rhs = torch.ones(3, dtype=torch.float64)
    _, info = implicitfn.Dense().solve(matrix_operator(matrix, rhs), rhs)
    assert not bool(info.converged)


def test_identity_returns_the_right_hand_side():
    matrix = 2 * torch.eye(3, dtype=torch.float64)
    rhs = torch.ones(3, dtype=torch.float64)
    solution, info = implicitfn.Identity().solve(matrix_operator(matrix, rhs), rhs)
    torch.testing.assert_close(solution, rhs)
    torch.testing.assert_close(info.residual_norm, torch.tensor(math.sqrt(3), dtype=torch.float64))


@pytest.mark.parametrize(
    "solver",
    [
        implicitfn.CG(max_steps=50, rtol=1e-10),
        implicitfn.Neumann(steps=15, alpha=0.05),
        implicitfn.FixedPoint(max_steps=300, alpha=0.05, rtol=1e-9),
        implicitfn.Dense(),
        implicitfn.Identity(),
    ],
    ids=lambda s: type(s).__name__,
)
def test_vmap_over_right_hand_sides_equals_loop(solver):
    matrix = spd_matrix(8, 30.0, 5)
    template = {"a": torch.zeros(5, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    operator = matrix_operator(matrix, template)
    rhs = {"a": torch.randn(6, 5, dtype=torch.float64), "b": torch.randn(6, 3, dtype=torch.float64)}
    rhs_before = clone_tree(rhs)
    batched, batched_info = torch.func.vmap(lambda b: solver.solve(operator, b))(rhs)
    for i in range(6):
        single, info = solver.solve(operator, {"a": rhs["a"][i], "b": rhs["b"][i]})
        assert_trees_close(
            {"a": batched["a"][i], "b": batched["b"][i]}, single, rtol=1e-8, atol=1e-10
        )
        assert int(batched_info.num_steps[i]) == int(info.num_steps)
        assert bool(batched_info.converged[i]) == bool(info.converged)
    assert_unchanged(rhs_before, rhs)


def test_warm_start_from_the_solution_needs_no_steps():
    matrix = spd_matrix(8, 30.0, 2)
    rhs = torch.randn(8, dtype=torch.float64)
    operator = matrix_operator(matrix, rhs)
    exact = torch.linalg.solve(matrix, rhs)
    _, info = implicitfn.CG(rtol=1e-8).solve(operator, rhs, initial=exact)
    assert int(info.num_steps) == 0 and bool(info.converged)


class TestBadInput:
    operator = matrix_operator(
        torch.eye(3, dtype=torch.float64), {"w": torch.zeros(3, dtype=torch.float64)}
    )

    def test_mismatched_structure(self):
        with pytest.raises(ValueError, match="vector: structure"):
            implicitfn.CG().solve(self.operator, {"v": torch.ones(3, dtype=torch.float64)})
        with pytest.raises(ValueError, match="vector: structure"):
            implicitfn.CG().solve(self.operator, {"w": torch.ones(4, dtype=torch.float64)})

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="floating point"):
            implicitfn.CG().solve(self.operator, {"w": torch.ones(3, dtype=torch.int64)})

    def test_non_finite(self):
        with pytest.raises(ValueError, match="NaN or Inf"):
            implicitfn.Dense().solve(
                self.operator, {"w": torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64)}
            )

    @pytest.mark.parametrize(
        "make",
        [
            lambda: implicitfn.CG(max_steps=0),
            lambda: implicitfn.Neumann(steps=-1),
            lambda: implicitfn.FixedPoint(max_steps=0),
        ],
    )
    def test_non_positive_steps(self, make):
        with pytest.raises(ValueError, match="positive number of steps"):
            make()

    def test_bad_alpha_and_tolerance(self):
        with pytest.raises(ValueError, match="alpha"):
            implicitfn.Neumann(alpha=0.0)
        with pytest.raises(ValueError, match="rtol"):
            implicitfn.CG(rtol=-1.0)

    def test_not_an_operator(self):
        with pytest.raises(TypeError, match="operator: expected"):
            implicitfn.CG().solve(torch.eye(3), torch.ones(3))

    def test_damping(self):
        with pytest.raises(ValueError, match="damping"):
            implicitfn.damp(self.operator, -1.0)
