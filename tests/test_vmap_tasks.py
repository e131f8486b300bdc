"""A batch of bilevel problems under `torch.func.vmap`: implicit MAML over tasks.

Each task adapts a small MLP to its support set, starting from the meta-parameters $\\theta$,
by minimising cross-entropy $+ \\tfrac{\\lambda}{2}\\lVert w - \\theta\\rVert^2$; the meta-loss is
the mean query cross-entropy of the adapted weights. The meta-gradient with respect to
$(\\theta, \\log\\lambda)$ computed with the whole batch under `vmap` (inner gradient steps,
optimality condition and backward CG solve all batched) must equal a Python loop over tasks,
and both must equal a dense implicit-function-theorem reference built without implicitfn.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_trees_close
from tensordict import TensorDict
from torch.func import grad, vmap

import implicitfn

DTYPE = torch.float64
FEATURES, HIDDEN, WAYS, SHOTS, QUERIES, TASKS = 8, 6, 3, 2, 4, 4
INNER_STEPS = 60
TASK_DIMS = (None, 0, 0, 0, 0)  # hparams shared, task data batched


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny batched ops: one thread avoids oversubscribing a shared machine (5-8x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model():
    net = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, WAYS)
    ).to(DTYPE)
    return implicitfn.functional_model(net)


APPLY, THETA = make_model()


def predict(params, hparams, x, y):
    return APPLY(params, x)


def output_loss(logits, hparams, x, y):
    return F.cross_entropy(logits, y)


def proximal(params, hparams, x, y):
    theta = hparams["theta"]
    squared = sum(((params[k] - theta[k]) ** 2).sum() for k in theta.keys(True, True))
    return 0.5 * hparams["log_lam"].exp() * squared


INNER_LOSS = implicitfn.CompositeLoss(predict, output_loss, proximal)


def gradient_steps(params, hparams, x, y):
    """The inner solver: a fixed number of gradient steps (vmappable: no data-dependent branch)."""
    step = grad(INNER_LOSS)
    lr = 1.0 / (1.0 + hparams["log_lam"].exp())  # stable for any lambda
    for _ in range(INNER_STEPS):
        params = implicitfn.tree_axpy(-lr, step(params, hparams, x, y), params)
    return params


def make_adapt(curvature, record):
    """The decorated inner solver; `record` collects one entry per call and per backward solve."""

    @implicitfn.implicit_diff(
        implicitfn.stationarity(INNER_LOSS),
        adjoint=implicitfn.ImplicitAdjoint(
            solver=implicitfn.CG(max_steps=80, rtol=1e-11),
            curvature=curvature,
            callback=lambda info: record["solves"].append(info),
            inner_rtol=None,  # a fixed number of adaptation steps, as in iMAML
        ),
    )
    def adapt(params, hparams, x, y):
        record["inner_calls"] += 1
        return gradient_steps(params, hparams, x, y)

    return adapt


def make_task_loss(adapt):
    def task_loss(hparams, xs, ys, xq, yq):
        adapted = adapt(hparams["theta"], hparams, xs, ys)
        return F.cross_entropy(APPLY(adapted, xq), yq)

    return task_loss


def make_tasks(seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(TASKS, WAYS, FEATURES, generator=gen, dtype=DTYPE)

    def draw(per_class):
        labels = torch.arange(WAYS).repeat_interleave(per_class).expand(TASKS, -1)
        noise = torch.randn(TASKS, WAYS * per_class, FEATURES, generator=gen, dtype=DTYPE)
        points = torch.stack([centres[t, labels[t]] for t in range(TASKS)]) + noise
        return points, labels.clone()

    return (*draw(SHOTS), *draw(QUERIES))


def make_hparams():
    return TensorDict({"theta": THETA.clone(), "log_lam": torch.tensor(0.0, dtype=DTYPE)})


def fresh_record():
    return {"inner_calls": 0, "solves": []}


def loop_meta_gradient(curvature, hparams, tasks):
    """The reference: task by task, with eager autograd (so each CG solve stops on its own)."""
    record = fresh_record()
    task_loss = make_task_loss(make_adapt(curvature, record))
    leaves = hparams.apply(lambda t: t.clone().requires_grad_())
    losses = [task_loss(leaves, *(part[t] for part in tasks)) for t in range(TASKS)]
    torch.stack(losses).mean().backward()
    return leaves.apply(lambda t: t.grad), record


CURVATURES = [
    pytest.param(implicitfn.Hessian(), id="hessian"),
    pytest.param(implicitfn.GaussNewton(), id="gauss-newton"),
]


@pytest.mark.parametrize("curvature", CURVATURES)
def test_vmapped_meta_gradient_equals_loop_over_tasks(curvature):
    hparams, tasks = make_hparams(), make_tasks()
    record = fresh_record()
    task_loss = make_task_loss(make_adapt(curvature, record))

    def meta_loss(h):
        return vmap(task_loss, in_dims=TASK_DIMS)(h, *tasks).mean()

    batched = grad(meta_loss)(hparams)
    looped, loop_record = loop_meta_gradient(curvature, hparams, tasks)

    assert_trees_close(batched, looped)
    assert float(implicitfn.tree_norm(looped)) > 1e-3  # a real signal, not two zeros
    # Batched, not unrolled: one inner solve and one backward solve for the whole batch ...
    assert record["inner_calls"] == 1 and loop_record["inner_calls"] == TASKS
    assert len(record["solves"]) == 1 and len(loop_record["solves"]) == TASKS
    info = record["solves"][0]
    assert info.successful.shape == (TASKS,) and bool(info.successful.all())
    # ... in which each task stops counting when its own residual is small enough, as the eager
    # loop's solves stop (its backward visits the tasks in reverse order), give or take one
    # step of rounding at the threshold; a common step count would report max_steps for all.
    steps = info.num_steps
    loop_steps = torch.stack([i.num_steps for i in reversed(loop_record["solves"])])
    assert int((steps - loop_steps).abs().max()) <= 1, (steps, loop_steps)
    if len(set(loop_steps.tolist())) > 2:  # the tasks really differ (not by one rounding step)
        assert len(set(steps.tolist())) > 1, f"tasks should need different step counts: {steps}"


def test_backward_through_vmap_equals_loop():
    curvature = implicitfn.Hessian()
    hparams, tasks = make_hparams(), make_tasks(seed=1)
    leaves = hparams.apply(lambda t: t.clone().requires_grad_())
    task_loss = make_task_loss(make_adapt(curvature, fresh_record()))

    vmap(task_loss, in_dims=TASK_DIMS)(leaves, *tasks).mean().backward()
    batched = leaves.apply(lambda t: t.grad)
    looped, _ = loop_meta_gradient(curvature, hparams, tasks)

    assert_trees_close(batched, looped)


def test_per_task_meta_gradients_under_vmap_of_grad():
    curvature = implicitfn.GaussNewton()
    hparams, tasks = make_hparams(), make_tasks(seed=2)
    task_loss = make_task_loss(make_adapt(curvature, fresh_record()))

    per_task = vmap(grad(task_loss), in_dims=TASK_DIMS)(hparams, *tasks)
    for t in range(TASKS):
        single = grad(task_loss)(hparams, *(part[t] for part in tasks))
        assert_trees_close(per_task.apply(lambda leaf, t=t: leaf[t], batch_size=[]), single)
    # and their mean is the meta-gradient of the mean loss
    looped, _ = loop_meta_gradient(curvature, hparams, tasks)
    assert_trees_close(per_task.apply(lambda leaf: leaf.mean(0), batch_size=[]), looped)


def dense_reference(hparams, tasks):
    """IFT with dense matrices and no implicitfn machinery: -(d^2L/dh dw) H^{-1} dLq/dw."""
    h_flat, unravel_h = implicitfn.tree_ravel(hparams)
    w_flat, unravel_w = implicitfn.tree_ravel(THETA)
    total = torch.zeros_like(h_flat)
    for t in range(TASKS):
        xs, ys, xq, yq = (part[t] for part in tasks)
        w_star = implicitfn.tree_ravel(gradient_steps(THETA, hparams, xs, ys))[0]

        def inner(w, h, xs=xs, ys=ys):
            return INNER_LOSS(unravel_w(w), unravel_h(h), xs, ys)

        hessian = torch.func.hessian(inner, argnums=0)(w_star, h_flat)
        cross = torch.func.jacrev(grad(inner, argnums=0), argnums=1)(w_star, h_flat)
        outer = grad(lambda w, xq=xq, yq=yq: F.cross_entropy(APPLY(unravel_w(w), xq), yq))(w_star)
        total -= cross.T @ torch.linalg.solve(hessian, outer)
    return unravel_h(total / TASKS)


def test_meta_gradient_matches_dense_ift_reference():
    hparams, tasks = make_hparams(), make_tasks(seed=3)
    task_loss = make_task_loss(make_adapt(implicitfn.Hessian(), fresh_record()))
    batched = grad(lambda h: vmap(task_loss, in_dims=TASK_DIMS)(h, *tasks).mean())(hparams)

    assert_trees_close(batched, dense_reference(hparams, tasks), rtol=1e-7, atol=1e-9)
