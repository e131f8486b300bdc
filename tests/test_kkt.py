"""The KKT condition against dense closed forms, the projected-gradient condition and finite
differences; bad inputs."""

import pytest
import torch
from tensordict import TensorDict
from torch.func import jacrev

import implicitfn

F64 = torch.float64
DENSE = implicitfn.ImplicitAdjoint(solver=implicitfn.Dense())
TIGHT_GMRES = implicitfn.ImplicitAdjoint(solver=implicitfn.GMRES(rtol=1e-12))


def spd(n: int, seed: int) -> torch.Tensor:
    m = torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return m @ m.T / n + torch.eye(n, dtype=F64)


# --- equality-constrained QP: min 1/2 w'Qw + c'w  s.t.  Aw = b ---------------------------------


def equality_qp(n=6, m=2, seed=0):
    gen = torch.Generator().manual_seed(seed + 1)
    q = spd(n, seed)
    a = torch.randn(m, n, dtype=F64, generator=gen)
    hparams = {
        "c": torch.randn(n, dtype=F64, generator=gen),
        "b": torch.randn(m, dtype=F64, generator=gen),
    }
    target = torch.randn(n, dtype=F64, generator=gen)
    return q, a, hparams, target


def kkt_solve(q, a, c, b):
    """The closed form: [[Q, A'], [A, 0]] [w; nu] = [-c; b]."""
    n, m = q.shape[0], a.shape[0]
    matrix = torch.cat([torch.cat([q, a.T], 1), torch.cat([a, torch.zeros(m, m, dtype=F64)], 1)], 0)
    solution = torch.linalg.solve(matrix, torch.cat([-c, b]))
    return solution[:n], solution[n:]


@pytest.mark.parametrize("adjoint", [DENSE, TIGHT_GMRES, None], ids=["dense", "gmres", "default"])
@pytest.mark.parametrize("tree", [dict, TensorDict], ids=["dict", "tensordict"])
def test_equality_qp_matches_the_closed_form(adjoint, tree):
    q, a, hparams, target = equality_qp()
    condition = implicitfn.kkt(
        lambda w, h: 0.5 * w @ q @ w + h["c"] @ w, equality=lambda w, h: a @ w - h["b"]
    )
    w, nu = kkt_solve(q, a, hparams["c"], hparams["b"])
    params = tree({"primal": w, "eq": nu})
    residual = condition.residual(params, hparams)
    assert type(residual) is type(params) and list(residual.keys()) == ["primal", "eq"]
    assert max(float(r.abs().max()) for r in residual.values()) < 1e-12

    def outer(p, h):
        return 0.5 * ((p["primal"] - target) ** 2).sum() + 0.1 * (p["eq"] ** 2).sum()

    got, info = implicitfn.hypergradient(condition, outer, params, hparams, adjoint=adjoint)

    def closed_form(c, b):
        w, nu = kkt_solve(q, a, c, b)
        return outer({"primal": w, "eq": nu}, None)

    want = jacrev(closed_form, argnums=(0, 1))(hparams["c"], hparams["b"])
    tol = 1e-3 if adjoint is None else 1e-9  # the default GMRES stops at rtol 1e-4
    for key, expected in zip(("c", "b"), want, strict=True):
        torch.testing.assert_close(got[key], expected, rtol=tol, atol=tol)
    assert int(info.outcome) == 0


# --- inequality-constrained QP: a box 0 <= w <= 1 as g(w) = (-w, w - 1) <= 0 --------------------


def box_qp(n=8, seed=3):
    q = spd(n, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    c = 2.0 * torch.randn(n, dtype=F64, generator=gen)
    target = torch.rand(n, dtype=F64, generator=gen)
    return q, {"c": c}, target


def solve_box_qp(q, c, steps=3000):
    """Projected gradient to find the active set, then the exact solve on the free coordinates;
    the multipliers from the gradient on the active bounds."""
    w = torch.zeros_like(c)
    step = 1.0 / float(torch.linalg.eigvalsh(q).max())
    for _ in range(steps):
        w = (w - step * (q @ w + c)).clamp(0.0, 1.0)
    lower, upper = w <= 1e-9, w >= 1 - 1e-9
    free = ~(lower | upper)
    w = torch.where(upper, 1.0, 0.0).to(F64)
    w[free] = torch.linalg.solve(q[free][:, free], -(c[free] + q[free][:, ~free] @ w[~free]))
    gradient = q @ w + c
    mu = torch.cat([torch.where(lower, gradient, 0.0), torch.where(upper, -gradient, 0.0)])
    return w, mu, free


def box_inequality(w, h):
    return torch.cat([-w, w - 1.0])


@pytest.mark.parametrize("adjoint", [DENSE, TIGHT_GMRES], ids=["dense", "gmres"])
def test_box_qp_matches_projected_gradient_and_the_reduced_system(adjoint):
    q, hparams, target = box_qp()
    w, mu, free = solve_box_qp(q, hparams["c"])
    active = torch.cat([w <= 0, w >= 1])
    assert 0 < int(free.sum()) < len(w), "the test wants some active bounds and some free ones"
    assert float(mu[active].min()) > 1e-2, "strict complementarity"

    def objective(w, h):
        return 0.5 * w @ q @ w + h["c"] @ w

    def outer(w, h):
        return 0.5 * ((w - target) ** 2).sum()

    condition = implicitfn.kkt(objective, inequality=box_inequality)
    params = {"primal": w, "ineq": mu}
    assert float(condition.residual(params, hparams)["primal"].abs().max()) < 1e-12
    got, _ = implicitfn.hypergradient(
        condition, lambda p, h: outer(p["primal"], h), params, hparams, adjoint=adjoint
    )

    projected = implicitfn.projected_gradient(
        objective, implicitfn.projection_box(0.0, 1.0), step=0.2
    )
    want, _ = implicitfn.hypergradient(projected, outer, w, hparams, adjoint=DENSE)
    torch.testing.assert_close(got["c"], want["c"], rtol=1e-9, atol=1e-9)

    def reduced(c):  # the equality system on the active set: w_F = -Q_FF^{-1}(c_F + Q_FA w_A)
        fixed = torch.where(w >= 1, 1.0, 0.0).to(F64)
        solution = -torch.linalg.solve(q[free][:, free], c[free] + q[free][:, ~free] @ fixed[~free])
        return outer(fixed.index_put((free,), solution), None)

    torch.testing.assert_close(got["c"], jacrev(reduced)(hparams["c"]), rtol=1e-9, atol=1e-9)


def test_nonnegative_qp_matches_projected_gradient():
    q, hparams, target = box_qp(n=6, seed=5)
    w = torch.zeros_like(hparams["c"])
    for _ in range(3000):
        w = (w - 0.2 * (q @ w + hparams["c"])).clamp(min=0.0)
    free = w > 1e-9
    w = torch.zeros_like(w)
    w[free] = torch.linalg.solve(q[free][:, free], -hparams["c"][free])
    mu = torch.where(free, 0.0, q @ w + hparams["c"])
    assert 0 < int(free.sum()) < len(w) and float(mu[~free].min()) > 1e-2

    def objective(w, h):
        return 0.5 * w @ q @ w + h["c"] @ w

    def outer(w, h):
        return (w * target).sum()

    condition = implicitfn.kkt(objective, inequality=lambda w, h: -w)
    got, _ = implicitfn.hypergradient(
        condition,
        lambda p, h: outer(p["primal"], h),
        {"primal": w, "ineq": mu},
        hparams,
        adjoint=DENSE,
    )
    projected = implicitfn.projected_gradient(objective, implicitfn.projection_nonnegative())
    want, _ = implicitfn.hypergradient(projected, outer, w, hparams, adjoint=DENSE)
    torch.testing.assert_close(got["c"], want["c"], rtol=1e-9, atol=1e-9)


# --- a nonlinear constraint with a hyperparameter in it, against finite differences -----------


def ball_solution(c, r):
    """argmin 1/2 |w - c|^2 s.t. |w|^2 <= r, with |c|^2 > r: w = sqrt(r) c/|c|, mu = (|c|/sqrt(r) - 1)/2."""
    norm = c.norm()
    return torch.sqrt(r) * c / norm, ((norm / torch.sqrt(r) - 1) / 2).reshape(1)


def test_ball_constraint_matches_finite_differences():
    hparams = {"c": torch.tensor([3.0, -1.0, 2.0], dtype=F64), "r": torch.tensor(2.0, dtype=F64)}
    condition = implicitfn.kkt(
        lambda w, h: 0.5 * ((w - h["c"]) ** 2).sum(),
        inequality=lambda w, h: (w @ w - h["r"]).reshape(1),
    )
    w, mu = ball_solution(hparams["c"], hparams["r"])
    params = {"primal": w, "ineq": mu}
    assert max(float(v.abs().max()) for v in condition.residual(params, hparams).values()) < 1e-12
    weights = torch.tensor([1.0, 2.0, -1.0], dtype=F64)

    def outer(p, h):
        return (weights * p["primal"]).sum() + p["primal"][0] ** 2

    got, _ = implicitfn.hypergradient(condition, outer, params, hparams, adjoint=TIGHT_GMRES)
    eps = 1e-6
    for key in ("c", "r"):
        flat = hparams[key].reshape(-1)
        fd = torch.empty_like(flat)
        for i in range(flat.numel()):
            values = []
            for sign in (1, -1):
                moved = dict(hparams)
                moved[key] = (flat + sign * eps * torch.eye(flat.numel(), dtype=F64)[i]).reshape(
                    hparams[key].shape
                )
                wm, mum = ball_solution(moved["c"], moved["r"])
                values.append(outer({"primal": wm, "ineq": mum}, moved))
            fd[i] = (values[0] - values[1]) / (2 * eps)
        torch.testing.assert_close(got[key].reshape(-1), fd, rtol=1e-6, atol=1e-7)


# --- bad inputs --------------------------------------------------------------------------------


def test_bad_arguments_raise_before_computing():
    f = lambda w, h: (w**2).sum()  # noqa: E731
    with pytest.raises(TypeError, match="objective: expected a callable"):
        implicitfn.kkt("f", equality=f)
    with pytest.raises(TypeError, match="equality: expected a callable"):
        implicitfn.kkt(f, equality=3)
    with pytest.raises(TypeError, match="inequality: expected a callable"):
        implicitfn.kkt(f, inequality=[f])
    with pytest.raises(ValueError, match="stationarity"):
        implicitfn.kkt(f)
    condition = implicitfn.kkt(f, equality=lambda w, h: w.sum(0, keepdim=True) - h)
    with pytest.raises(TypeError, match=r"params: expected a dict or TensorDict"):
        condition.residual(torch.ones(2), torch.ones(1))
    with pytest.raises(TypeError, match=r"params: expected the keys \['primal', 'eq'\]"):
        condition.residual({"primal": torch.ones(2), "ineq": torch.ones(1)}, torch.ones(1))
    with pytest.raises(ValueError, match=r"equality: returned shape \(1,\)"):
        condition.residual({"primal": torch.ones(2), "eq": torch.ones(3)}, torch.ones(1))
    vector_objective = implicitfn.kkt(lambda w, h: w, equality=lambda w, h: w.sum(0, keepdim=True))
    with pytest.raises(TypeError, match="objective: must return a scalar"):
        vector_objective.residual({"primal": torch.ones(2), "eq": torch.ones(1)}, None)
