import pytest
import torch
from helpers import assert_trees_close, assert_unchanged, clone_tree
from tensordict import TensorDict

import implicitfn


def mlp_loss():
    """A small tanh network with a per-weight penalty, as a CompositeLoss."""

    def predict(params, hparams, x, y):
        return torch.tanh(x @ params["layer1"]) @ params["layer2"]

    def output_loss(outputs, hparams, x, y):
        return 0.5 * ((outputs - y) ** 2).mean()

    def penalty(params, hparams, x, y):
        return 0.5 * sum((hparams[k].exp() * params[k] ** 2).sum() for k in ("layer1", "layer2"))

    return implicitfn.CompositeLoss(predict, output_loss, penalty)


def mlp_point(dtype=torch.float64):
    params = TensorDict(
        {"layer1": torch.randn(4, 6, dtype=dtype), "layer2": torch.randn(6, dtype=dtype)}
    )
    hparams = TensorDict(
        {
            "layer1": torch.full((4, 6), -3.0, dtype=dtype),
            "layer2": torch.full((6,), -3.0, dtype=dtype),
        }
    )
    x, y = torch.randn(30, 4, dtype=dtype), torch.randn(30, dtype=dtype)
    return params, hparams, x, y


def dense_hessian(loss, params, hparams, *args):
    flat, unravel = implicitfn.tree_ravel(params)
    return torch.func.hessian(lambda v: loss(unravel(v), hparams, *args))(flat)


@pytest.mark.parametrize("mode", ["reverse-over-reverse", "forward-over-reverse"])
def test_hessian_products_match_torch_func_hessian(mode):
    loss = mlp_loss()
    params, hparams, x, y = mlp_point()
    before = clone_tree((params, hparams))
    operator = implicitfn.Hessian(mode).linearize(loss, params, hparams, x, y)
    expected = dense_hessian(loss, params, hparams, x, y)
    torch.testing.assert_close(operator.as_matrix(), expected)
    vector = TensorDict(
        {
            "layer1": torch.randn(4, 6, dtype=torch.float64),
            "layer2": torch.randn(6, dtype=torch.float64),
        }
    )
    flat_vector, unravel = implicitfn.tree_ravel(vector)
    assert_trees_close(operator.mv(vector), unravel(expected @ flat_vector))
    assert operator.is_symmetric
    assert_unchanged(before, (params, hparams))


def test_hessian_modes_agree_in_float32():
    loss = mlp_loss()
    params, hparams, x, y = mlp_point(torch.float32)
    reverse = implicitfn.Hessian("reverse-over-reverse").linearize(loss, params, hparams, x, y)
    forward = implicitfn.Hessian("forward-over-reverse").linearize(loss, params, hparams, x, y)
    torch.testing.assert_close(reverse.as_matrix(), forward.as_matrix(), rtol=1e-4, atol=1e-5)


def test_gauss_newton_equals_hessian_for_linear_least_squares():
    loss = implicitfn.CompositeLoss(
        predict=lambda p, h, x, y: x @ p["w"],
        output_loss=lambda out, h, x, y: 0.5 * ((out - y) ** 2).sum(),
        penalty=lambda p, h, x, y: 0.5 * (h * p["w"] ** 2).sum(),
    )
    params = {"w": torch.randn(5, dtype=torch.float64)}
    args = (
        torch.tensor(0.3, dtype=torch.float64),
        torch.randn(20, 5, dtype=torch.float64),
        torch.randn(20, dtype=torch.float64),
    )
    gauss_newton = implicitfn.GaussNewton().linearize(loss, params, *args).as_matrix()
    hessian = implicitfn.Hessian().linearize(loss, params, *args).as_matrix()
    torch.testing.assert_close(gauss_newton, hessian)


def test_gauss_newton_is_psd_where_the_hessian_is_not():
    loss = mlp_loss()
    params, hparams, x, y = mlp_point()
    params = params.apply(lambda t: 3 * t)  # far from a minimum: indefinite Hessian
    hparams = hparams.apply(lambda t: t - 10)
    hessian = implicitfn.Hessian().linearize(loss, params, hparams, x, y).as_matrix()
    gauss_newton = implicitfn.GaussNewton().linearize(loss, params, hparams, x, y).as_matrix()
    assert float(torch.linalg.eigvalsh(hessian).min()) < -1e-6
    torch.testing.assert_close(gauss_newton, gauss_newton.T)
    assert float(torch.linalg.eigvalsh(gauss_newton).min()) > -1e-10


def test_gauss_newton_needs_a_composite_loss():
    with pytest.raises(TypeError, match="CompositeLoss"):
        implicitfn.GaussNewton().linearize(lambda p, h: (p**2).sum(), torch.ones(2), None)


@pytest.mark.parametrize("mode", ["reverse-over-reverse", "forward-over-reverse"])
def test_non_scalar_loss_is_refused_before_any_solve(mode):
    with pytest.raises(ValueError, match="loss: must return a scalar"):
        operator = implicitfn.Hessian(mode).linearize(lambda p, h: p**2, torch.ones(2), None)
        operator.mv(torch.ones(2))


def test_damping_adds_a_multiple_of_the_identity():
    operator = implicitfn.Hessian().linearize(
        lambda p, h: (p**2).sum(), torch.ones(3, dtype=torch.float64), None
    )
    damped = implicitfn.damp(operator, 0.5)
    torch.testing.assert_close(damped.as_matrix(), 2.5 * torch.eye(3, dtype=torch.float64))
    assert damped.tags == operator.tags


def test_vmap_over_vectors_equals_loop():
    loss = mlp_loss()
    params, hparams, x, y = mlp_point()
    for curvature in (
        implicitfn.Hessian(),
        implicitfn.Hessian("forward-over-reverse"),
        implicitfn.GaussNewton(),
    ):
        operator = curvature.linearize(loss, params, hparams, x, y)
        vectors = TensorDict(
            {
                "layer1": torch.randn(5, 4, 6, dtype=torch.float64),
                "layer2": torch.randn(5, 6, dtype=torch.float64),
            },
            batch_size=[5],
        )
        batched = torch.func.vmap(operator.mv)(vectors)
        for i in range(5):
            assert_trees_close(batched[i], operator.mv(vectors[i]))


def test_cross_vjp_matches_dense_mixed_derivative():
    loss = mlp_loss()
    params, hparams, x, y = mlp_point()
    condition = implicitfn.stationarity(loss)
    cotangent = TensorDict(
        {
            "layer1": torch.randn(4, 6, dtype=torch.float64),
            "layer2": torch.randn(6, dtype=torch.float64),
        }
    )
    hparams_bar, args_bar = implicitfn.cross_vjp(condition, cotangent, params, hparams, x, y)
    flat_w, unravel_w = implicitfn.tree_ravel(params)
    flat_h, unravel_h = implicitfn.tree_ravel(hparams)

    def grad_w(h_flat):
        return implicitfn.tree_ravel(torch.func.grad(loss)(params, unravel_h(h_flat), x, y))[0]

    mixed = torch.func.jacrev(grad_w)(flat_h)  # d(grad_w)/d lambda
    expected = mixed.T @ implicitfn.tree_ravel(cotangent)[0]
    torch.testing.assert_close(implicitfn.tree_ravel(hparams_bar)[0], expected)
    assert args_bar[0].shape == x.shape and args_bar[1].shape == y.shape
