"""The inner solver's graph is freed, and memory stays flat across outer steps."""

import gc
import os
import weakref

import torch
from tensordict import TensorDict

import implicitfn
from implicitfn.testing import ridge_loss

X = torch.randn(64, 20)
Y = torch.randn(64)
X_VAL, Y_VAL = torch.randn(64, 20), torch.randn(64)
KEPT: list[weakref.ref] = []


@implicitfn.implicit_diff(
    implicitfn.stationarity(ridge_loss),
    adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG(max_steps=20, rtol=0)),
)
def sgd_inner(params, hparams, x, y):
    """A plain autograd SGD loop: the kind of graph that must not be kept."""
    w = params["w"].clone().requires_grad_()
    for _ in range(30):
        loss = ridge_loss({"w": w}, hparams, x, y)
        (gradient,) = torch.autograd.grad(loss, w)
        w = (w - 0.005 * gradient).detach().requires_grad_()
        KEPT.append(weakref.ref(loss))
    return TensorDict({"w": w.detach()})


def resident_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def outer_step(log_penalty, params):
    hparams = TensorDict({"penalty": log_penalty.exp()})
    params = sgd_inner(params, hparams, X, Y)
    validation = 0.5 * ((X_VAL @ params["w"] - Y_VAL) ** 2).mean()
    (gradient,) = torch.autograd.grad(validation, log_penalty)
    with torch.no_grad():
        log_penalty -= 0.1 * gradient
    return params.detach()


def test_inner_graph_is_not_kept():
    log_penalty = torch.zeros(20, requires_grad=True)
    hparams = TensorDict({"penalty": log_penalty.exp()})
    output = sgd_inner(TensorDict({"w": torch.zeros(20)}), hparams, X, Y)
    gc.collect()
    assert all(ref() is None for ref in KEPT), "the inner loop's losses are still alive"
    assert output["w"].requires_grad


def test_memory_is_flat_over_500_outer_steps():
    log_penalty = torch.zeros(20, requires_grad=True)
    params = TensorDict({"w": torch.zeros(20)})
    for _ in range(50):
        params = outer_step(log_penalty, params)
    gc.collect()
    start = resident_bytes()
    for _ in range(450):
        params = outer_step(log_penalty, params)
    gc.collect()
    growth = resident_bytes() - start
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 450 steps"
    assert torch.isfinite(log_penalty).all()
