"""vmap over batches of problems, and jacrev, through implicit_diff."""

import pytest
import torch
from problems import ridge_inner
from tensordict import TensorDict

import implicitfn
from implicitfn.testing import ridge_hypergradient, ridge_solution

SOLVERS = [
    implicitfn.CG(rtol=1e-12),
    implicitfn.Dense(),
    implicitfn.FixedPoint(max_steps=3000, alpha=0.02, rtol=1e-11),
    implicitfn.Neumann(max_steps=3000, alpha=0.02, rtol=1e-10),
]


def batch_of_problems(batch=4, n=20, d=3):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    x_val = torch.randn(batch, n, d, generator=gen, dtype=torch.float64)
    y_val = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    penalty = torch.rand(batch, d, generator=gen, dtype=torch.float64) + 0.5
    return penalty, x, y, x_val, y_val


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_vmap_over_problems_equals_loop(solver):
    penalty, x, y, x_val, y_val = batch_of_problems()
    inner = ridge_inner(solver)

    def outer(p, x, y, x_val, y_val):
        w = inner(
            TensorDict({"w": torch.zeros(3, dtype=torch.float64)}), TensorDict({"penalty": p}), x, y
        )
        return 0.5 * ((x_val @ w["w"] - y_val) ** 2).sum()

    batched = torch.func.vmap(torch.func.grad(outer))(penalty, x, y, x_val, y_val)
    looped = torch.stack(
        [torch.func.grad(outer)(*(t[i] for t in (penalty, x, y, x_val, y_val))) for i in range(4)]
    )
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-11)
    expected = torch.stack(
        [ridge_hypergradient(*(t[i] for t in (penalty, x, y, x_val, y_val))) for i in range(4)]
    )
    torch.testing.assert_close(batched, expected, rtol=1e-7, atol=1e-9)


def test_vmap_over_batched_tensordict_hparams_and_shared_data():
    penalty, x, y, _, _ = batch_of_problems()
    infos = []
    inner = ridge_inner(implicitfn.CG(rtol=1e-12), callback=infos.append)
    hparams = TensorDict({"penalty": penalty}, batch_size=[4])

    def norm_of_solution(h):
        return (
            inner(TensorDict({"w": torch.zeros(3, dtype=torch.float64)}), h, x[0], y[0])["w"] ** 2
        ).sum()

    batched = torch.func.vmap(torch.func.grad(norm_of_solution))(hparams)
    for i in range(4):
        single = torch.func.grad(lambda p: (ridge_solution(p, x[0], y[0]) ** 2).sum())(penalty[i])
        torch.testing.assert_close(batched["penalty"][i], single)
    assert infos[0].outcome.shape == (4,) and bool(infos[0].successful.all())


@pytest.mark.parametrize(
    "solver", [implicitfn.CG(rtol=1e-12), implicitfn.Dense()], ids=["CG", "Dense"]
)
def test_jacrev_equals_stacked_grads(solver):
    penalty, x, y, _, _ = batch_of_problems()
    inner = ridge_inner(solver)

    def solution(p):
        return inner(
            TensorDict({"w": torch.zeros(3, dtype=torch.float64)}),
            TensorDict({"penalty": p}),
            x[0],
            y[0],
        )["w"]

    jacobian = torch.func.jacrev(solution)(penalty[0])
    rows = torch.stack(
        [torch.func.grad(lambda p, i=i: solution(p)[i])(penalty[0]) for i in range(3)]
    )
    torch.testing.assert_close(jacobian, rows)
    expected = torch.func.jacrev(lambda p: ridge_solution(p, x[0], y[0]))(penalty[0])
    torch.testing.assert_close(jacobian, expected)
