"""functional_model: an nn.Module with BatchNorm and Dropout as a pure function of its parameters.

Each mode must equal the module's own forward in the matching train/eval mode, work under every
torch.func transform and implicitfn's curvature products, give the dense implicit-function-theorem
hypergradient, and never change the caller's module or parameters.
"""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from helpers import assert_trees_close, assert_unchanged, clone_tree, lbfgs_in_place
from tensordict import TensorDict

import implicitfn

DTYPE = torch.float64
MODES = ["batch", "running"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread avoids oversubscribing a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_net(seed: int = 0) -> torch.nn.Module:
    """A BatchNorm1d + Dropout MLP in train mode, with non-trivial running statistics."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 6),
        torch.nn.BatchNorm1d(6),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(6, 2),
    ).to(DTYPE)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, dtype=DTYPE) + 1.0)
    return net


def data(seed: int = 1, n: int = 24):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, dtype=DTYPE, generator=generator)
    y = torch.randn(n, 2, dtype=DTYPE, generator=generator)
    return x, y


def reference(net: torch.nn.Module, batch_norm: str, dropout: str) -> torch.nn.Module:
    """A deep copy of `net` put in the modes `functional_model` promises to reproduce."""
    ref = copy.deepcopy(net).train(dropout == "on")
    ref[1].train(batch_norm == "batch")
    return ref


def state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (running_mean, running_var, num_batches_tracked), cloned."""
    return {name: t.detach().clone() for name, t in net.state_dict().items()}


def assert_state_identical(net: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = net.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed"
    assert all(p.grad is None for p in net.parameters())


def composite_loss(apply) -> implicitfn.CompositeLoss:
    def penalty(p, h, x, y):
        return 0.5 * h["decay"] * sum((t**2).sum() for t in p.values(True, True))

    return implicitfn.CompositeLoss(
        predict=lambda p, h, x, y: apply(p, x),
        output_loss=lambda out, h, x, y: 0.5 * ((out - y) ** 2).sum(dim=1).mean(),
        penalty=penalty,
    )


def random_trees(template: TensorDict, count: int) -> TensorDict:
    return template.apply(lambda t: torch.randn(count, *t.shape, dtype=t.dtype), batch_size=[count])


# -- what apply computes --------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm", MODES)
@pytest.mark.parametrize("dropout", ["off", "on"])
def test_apply_equals_module_forward_in_the_matching_mode(batch_norm, dropout):
    net = make_net()
    apply, params = implicitfn.functional_model(net, batch_norm=batch_norm, dropout=dropout)
    x, _ = data()
    ref = reference(net, batch_norm, dropout)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        out = apply(params, x)
        torch.manual_seed(5)
        expected = ref(x)  # the same masks when dropout is on
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if batch_norm == "running" and dropout == "off":
        assert torch.equal(out, copy.deepcopy(net).eval()(x))  # exactly module.eval()


def test_default_is_batch_statistics_and_dropout_off():
    net = make_net()
    apply, params = implicitfn.functional_model(net)
    assert (apply.batch_norm, apply.dropout) == ("batch", "off")
    x, _ = data()
    first = apply(params, x)
    assert torch.equal(first, apply(params, x))  # deterministic
    torch.testing.assert_close(first, reference(net, "batch", "off")(x), rtol=1e-12, atol=1e-12)
    # Batch statistics: not the eval-mode output, which uses the running statistics.
    assert not torch.allclose(first, copy.deepcopy(net).eval()(x))


def test_dropout_off_equals_eval_mode_and_on_draws_masks():
    net = make_net()
    x, _ = data()
    off, params = implicitfn.functional_model(net, batch_norm="running", dropout="off")
    outputs = [off(params, x) for _ in range(3)]
    assert all(torch.equal(o, copy.deepcopy(net).eval()(x)) for o in outputs)
    on, _ = implicitfn.functional_model(net, batch_norm="running", dropout="on")
    assert not torch.equal(on(params, x), on(params, x))  # a new mask per call
    with torch.random.fork_rng():  # one seed, one mask: deterministic again
        torch.manual_seed(3)
        a = on(params, x)
        torch.manual_seed(3)
        b = on(params, x)
    assert torch.equal(a, b)


def test_plain_module_and_dict_params_keep_working():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(
        DTYPE
    )
    apply, params = implicitfn.functional_model(net)
    x, _ = data()
    assert isinstance(params, TensorDict) and not params.requires_grad
    assert torch.equal(apply(params, x), net(x))
    assert torch.equal(apply(params.to_dict(), x), net(x))  # a nested dict works too
    assert apply.buffers.is_empty()


def test_buffers_are_an_explicit_snapshot():
    net = make_net()
    running, _ = implicitfn.functional_model(net, batch_norm="running")
    assert torch.equal(running.buffers["1", "running_mean"], net[1].running_mean)
    assert running.buffers["1", "running_mean"].data_ptr() != net[1].running_mean.data_ptr()
    batch, _ = implicitfn.functional_model(net, batch_norm="batch")
    assert batch.buffers.is_empty()  # batch statistics read no running statistics


# -- transforms and curvature: agree with references, and never touch the module -------------


@pytest.mark.parametrize("batch_norm", MODES)
def test_transforms_agree_with_autograd_and_loops(batch_norm):
    net = make_net()
    before = state(net)
    apply, params = implicitfn.functional_model(net, batch_norm=batch_norm)
    params_before = clone_tree(params)
    x, y = data()

    def loss(p):
        return 0.5 * ((apply(p, x) - y) ** 2).sum()

    # torch.func.grad against plain autograd.
    leaves = params.clone().requires_grad_()
    expected = torch.autograd.grad(loss(leaves), list(leaves.values(True, True)))
    assert_trees_close(list(torch.func.grad(loss)(params).values(True, True)), list(expected))
    # jvp against vjp: <u, J v> = <J^T u, v>.
    v = random_trees(params, 1)[0]
    u = torch.randn(x.shape[0], 2, dtype=DTYPE)
    _, jv = torch.func.jvp(lambda p: apply(p, x), (params,), (v,))
    (jtu,) = torch.func.vjp(lambda p: apply(p, x), params)[1](u)
    torch.testing.assert_close((u * jv).sum(), implicitfn.tree_vdot(jtu, v), rtol=1e-10, atol=0)
    # vmap over a stack of batches, and over a stack of parameters, against loops.
    batches = x.reshape(3, 8, 3)
    assert_trees_close(
        torch.func.vmap(lambda xb: apply(params, xb))(batches),
        torch.stack([apply(params, xb) for xb in batches]),
    )
    ensemble = params.apply(
        lambda t: t + 0.1 * torch.randn(2, *t.shape, dtype=DTYPE), batch_size=[2]
    )
    assert_trees_close(
        torch.func.vmap(apply, in_dims=(0, None))(ensemble, x),
        torch.stack([apply(ensemble[i], x) for i in range(2)]),
    )
    assert_state_identical(net, before)
    assert_unchanged(params_before, params)


@pytest.mark.parametrize("batch_norm", MODES)
@pytest.mark.parametrize(
    "curvature", [implicitfn.GaussNewton(), implicitfn.Hessian()], ids=["gn", "hessian"]
)
def test_vmapped_curvature_products_equal_a_loop(batch_norm, curvature):
    """Issue 16: Gauss-Newton products under vmap failed with "mutate a captured Tensor"."""
    net = make_net()
    before = state(net)
    apply, params = implicitfn.functional_model(net, batch_norm=batch_norm)
    x, y = data()
    hparams = {"decay": torch.tensor(0.1, dtype=DTYPE)}
    op = curvature.linearize(composite_loss(apply), params, hparams, x, y)
    vectors = random_trees(params, 4)
    batched = torch.func.vmap(op.mv)(vectors)
    looped = torch.stack([op.mv(vectors[i]) for i in range(4)])
    assert_trees_close(batched, looped)
    assert_state_identical(net, before)


# -- hypergradients against a dense float64 oracle ------------------------------------------


def inner_solution(apply, params, hparams, x, y):
    """Minimise the training loss with L-BFGS on copies (the caller's tensors stay as they are)."""
    return lbfgs_in_place(composite_loss(apply), tolerance_grad=1e-12)(
        params.clone(), hparams, x, y
    )


def dense_hypergradient(apply, solution, hparams, x, y, x_val, y_val, gauss_newton: bool):
    """dL_V/d(decay) = -B^T A^{-1} dL_V/dw with dense A (Hessian or Gauss-Newton) and B."""
    loss = composite_loss(apply)
    w, unravel = implicitfn.tree_ravel(solution)
    decay = hparams["decay"]

    def gradient(w_flat, d):
        return implicitfn.tree_ravel(torch.func.grad(loss)(unravel(w_flat), {"decay": d}, x, y))[0]

    if gauss_newton:
        jacobian = torch.func.jacrev(lambda v: apply(unravel(v), x).reshape(-1))(w)
        outputs = apply(solution, x).reshape(-1)
        output_hessian = torch.func.hessian(
            lambda o: loss.output_loss(o.reshape(-1, 2), hparams, x, y)
        )(outputs)
        matrix = jacobian.T @ output_hessian @ jacobian + decay * torch.eye(w.numel(), dtype=DTYPE)
    else:
        matrix = torch.func.jacrev(gradient)(w, decay)
    mixed = torch.func.jacrev(gradient, argnums=1)(w, decay)
    outer = torch.func.grad(
        lambda v: 0.5 * ((apply(unravel(v), x_val) - y_val) ** 2).sum(dim=1).mean()
    )(w)
    return -mixed @ torch.linalg.solve(matrix, outer)


@pytest.mark.parametrize("batch_norm", MODES)
@pytest.mark.parametrize("curvature", ["hessian", "gauss-newton"])
def test_hypergradient_matches_dense_oracle_without_side_effects(batch_norm, curvature):
    net = make_net()
    before = state(net)
    apply, params = implicitfn.functional_model(net, batch_norm=batch_norm)
    params_before = clone_tree(params)
    x, y = data(1)
    x_val, y_val = data(2, n=16)
    hparams = {"decay": torch.tensor(0.1, dtype=DTYPE)}
    solution = inner_solution(apply, params, hparams, x, y)
    if curvature == "hessian":  # symmetric, possibly indefinite on a network: MINRES
        adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.MINRES(max_steps=300, rtol=1e-12))
    else:  # positive definite with the penalty: CG
        adjoint = implicitfn.ImplicitAdjoint(
            solver=implicitfn.CG(max_steps=300, rtol=1e-12), curvature=implicitfn.GaussNewton()
        )

    def outer_loss(p, h, x, y):
        return 0.5 * ((apply(p, x) - y) ** 2).sum(dim=1).mean()

    result, info = implicitfn.hypergradient(
        composite_loss(apply),
        outer_loss,
        solution,
        hparams,
        inner_args=(x, y),
        outer_args=(x_val, y_val),
        adjoint=adjoint,
    )
    assert bool(info.successful), info
    expected = dense_hypergradient(
        apply, solution, hparams, x, y, x_val, y_val, gauss_newton=curvature == "gauss-newton"
    )
    torch.testing.assert_close(result["decay"], expected, rtol=1e-7, atol=1e-12)
    assert_state_identical(net, before)
    assert_unchanged(params_before, params)
    assert net.training and net[3].training  # its train/eval flags too


NORM_LAYERS = {
    "bn-no-running-stats": lambda: torch.nn.BatchNorm1d(4, track_running_stats=False),
    "bn-cumulative": lambda: torch.nn.BatchNorm1d(4, momentum=None),
    "instance-norm-tracked": lambda: torch.nn.InstanceNorm1d(
        4, affine=True, track_running_stats=True
    ),
    "batchnorm2d": lambda: torch.nn.BatchNorm2d(4),
}


@pytest.mark.parametrize("batch_norm", MODES)
@pytest.mark.parametrize("layer", list(NORM_LAYERS), ids=str)
def test_other_normalisation_layers(batch_norm, layer):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 2) if layer == "batchnorm2d" else torch.nn.Conv1d(3, 4, 2)
    net = torch.nn.Sequential(conv, NORM_LAYERS[layer](), torch.nn.Tanh()).to(DTYPE)
    x = torch.randn(5, 3, 6, 6, dtype=DTYPE)[..., 0, :] if layer != "batchnorm2d" else None
    x = torch.randn(5, 3, 4, 4, dtype=DTYPE) if x is None else x
    with torch.no_grad():
        net(x + 1.0)  # non-trivial running statistics where there are any
    before = state(net)
    apply, params = implicitfn.functional_model(net, batch_norm=batch_norm)
    ref = copy.deepcopy(net).eval()
    ref[1].train(batch_norm == "batch")
    torch.testing.assert_close(apply(params, x), ref(x), rtol=1e-12, atol=1e-12)
    torch.func.grad(lambda p: apply(p, x).square().sum())(params)
    torch.func.vmap(lambda xb: apply(params, xb))(torch.stack([x, 2 * x]))
    assert_state_identical(net, before)


# -- modules deepcopy refuses, parametrisations ----------------------------------------------


class Locked(torch.nn.Module):
    """A module holding an object deepcopy refuses: apply switches its modes around each call."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5)
        )

    def forward(self, x):
        with self.lock:
            return self.body(x)


@pytest.mark.parametrize("batch_norm", MODES)
def test_a_module_that_cannot_be_copied_is_switched_and_restored(batch_norm):
    torch.manual_seed(0)
    net = Locked().to(DTYPE)
    with pytest.raises(TypeError):
        copy.deepcopy(net)
    before = state(net)
    apply, params = implicitfn.functional_model(net, batch_norm=batch_norm)
    x, _ = data()
    out = apply(params, x)
    grads = torch.func.grad(lambda p: apply(p, x).square().sum())(params)
    torch.func.vmap(lambda xb: apply(params, xb))(x.reshape(3, 8, 3))
    assert not grads.isnan().any()
    ref = copy.deepcopy(net.body).train(False)
    ref[1].train(batch_norm == "batch")
    torch.testing.assert_close(out, ref(x), rtol=1e-12, atol=1e-12)
    assert all(m.training for m in net.modules())  # restored after each call
    assert_state_identical(net, before)


def test_parametrized_weights():
    torch.manual_seed(0)
    net = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(3, 2).to(DTYPE))
    apply, params = implicitfn.functional_model(net)
    x, _ = data()
    torch.testing.assert_close(apply(params, x), net(x), rtol=1e-12, atol=1e-12)


# -- misuse ----------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    net = make_net()
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module"):
        implicitfn.functional_model(lambda x: x)
    with pytest.raises(ValueError, match=r"batch_norm: expected one of 'batch', 'running'"):
        implicitfn.functional_model(net, batch_norm="eval")
    with pytest.raises(TypeError, match="batch_norm: expected one of"):
        implicitfn.functional_model(net, batch_norm=True)
    with pytest.raises(ValueError, match=r"dropout: expected one of 'off', 'on'"):
        implicitfn.functional_model(net, dropout="train")
    with pytest.raises(TypeError, match="dropout: expected one of"):
        implicitfn.functional_model(net, dropout=False)
    with pytest.raises(ValueError, match="lazy parameters .*run one forward pass"):
        implicitfn.functional_model(torch.nn.LazyLinear(2))
    apply, params = implicitfn.functional_model(net)
    x, _ = data()
    with pytest.raises(
        TypeError, match="params: expected the TensorDict returned by functional_model"
    ):
        apply(torch.zeros(3), x)
    partial = params.exclude(("4", "bias"))
    with pytest.raises(ValueError, match=r"params: must hold exactly .*missing '4.bias'"):
        apply(partial, x)
    extra = params.clone().set("scale", torch.ones(()))
    with pytest.raises(ValueError, match=r"unexpected 'scale'"):
        apply(extra, x)


def test_eval_mode_module_warns_unless_batch_norm_is_given():
    net = make_net().eval()
    with pytest.warns(UserWarning, match="module is in eval mode.*batch_norm='running'"):
        implicitfn.functional_model(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        implicitfn.functional_model(net, batch_norm="running")
        implicitfn.functional_model(net, batch_norm="batch")
        implicitfn.functional_model(torch.nn.Linear(2, 2).eval())  # nothing to choose
