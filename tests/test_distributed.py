"""Data parallelism over torch.distributed: two gloo processes, started here, against one process
on all the data.

The same function, `scenarios(rank, world, distributed)`, computes every result: in the test
process on the full data (`world=1`, `distributed=False`) and in two ranks on halves of it. Each
rank is a subprocess running this file (`python tests/test_distributed.py WORKER RANK WORLD DIR`),
so the test controls their lifetime: the process group has a timeout, the launcher kills every
rank at a deadline, and once one rank fails the others get a short grace period.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import implicitfn

WORLD = 2
DTYPE = torch.float64
TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}  # float64; measured differences are ~1e-16
GROUP_TIMEOUT_S = 60  # a collective that waits longer than this raises in the rank
LAUNCH_TIMEOUT_S = 240  # the whole launch; past it every rank is killed
GRACE_S = 20  # once a rank has failed, how long the others get to exit

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


# ---------------------------------------------------------------- problems, on any shard


def shard(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s equal share of the rows (the mean of local means is the full mean)."""
    return tensor.chunk(world)[rank]


def logistic_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen, dtype=DTYPE)
    truth = torch.randn(5, generator=gen, dtype=DTYPE)
    y = (x @ truth + 0.5 * torch.randn(64, generator=gen, dtype=DTYPE) > 0).to(DTYPE)
    return x[:32], y[:32], x[32:], y[32:]


def logistic_loss(params, hparams, x, y):
    data = F.binary_cross_entropy_with_logits(x @ params["w"] + params["b"], y)
    return data + 0.5 * (hparams["log_decay"].exp() * params["w"] ** 2).sum()


def logistic_validation(params, hparams, x, y):
    # The second term depends on the hyperparameters directly: a direct part dL_V/dlambda.
    data = F.binary_cross_entropy_with_logits(x @ params["w"] + params["b"], y)
    return data + 1e-2 * (hparams["log_decay"] ** 2).sum()


def logistic_start():
    """(params, hparams) where the logistic problem starts: zero weights, zero log-decays."""
    params = {"w": torch.zeros(5, dtype=DTYPE), "b": torch.zeros((), dtype=DTYPE)}
    return params, {"log_decay": torch.zeros(5, dtype=DTYPE)}


def logistic_hypergradient(params, hparams, data, adjoint):
    """`implicitfn.hypergradient` of the logistic problem at `params`, on `data` = (x, y, x_val,
    y_val) (this rank's shards when `adjoint` is distributed)."""
    x, y, x_val, y_val = data
    return implicitfn.hypergradient(
        logistic_loss,
        logistic_validation,
        params,
        hparams,
        inner_args=(x, y),
        outer_args=(x_val, y_val),
        adjoint=adjoint,
    )


def mlp_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 3, generator=gen, dtype=DTYPE)
    y = torch.sin(x.sum(1)) + 0.1 * torch.randn(48, generator=gen, dtype=DTYPE)
    return x[:24], y[:24], x[24:], y[24:]


def mlp_predict(params, hparams, x, y=None):
    return torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


MLP_LOSS = implicitfn.CompositeLoss(
    predict=mlp_predict,
    output_loss=lambda out, hparams, x, y: 0.5 * ((out - y) ** 2).mean(),
    penalty=lambda params, hparams, x, y: (
        0.5 * hparams["log_decay"].exp()[0] * (params["w1"] ** 2).sum()
        + 0.5 * hparams["log_decay"].exp()[1] * (params["w2"] ** 2).sum()
    ),
)


def mlp_validation(params, hparams, x, y):
    return 0.5 * ((mlp_predict(params, hparams, x) - y) ** 2).mean()


def mlp_init():
    gen = torch.Generator().manual_seed(2)
    return {
        "w1": 0.5 * torch.randn(3, 8, generator=gen, dtype=DTYPE),
        "b1": torch.zeros(8, dtype=DTYPE),
        "w2": 0.5 * torch.randn(8, generator=gen, dtype=DTYPE),
        "b2": torch.zeros((), dtype=DTYPE),
    }


# ---------------------------------------------------------------- inner solvers (data parallel)


def averager(distributed, group=None):
    """`tensor -> mean over ranks` for the inner solve (plain torch.distributed, like DDP)."""
    if distributed is False:
        return lambda tensor: tensor

    def average(tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor / dist.get_world_size(group)

    return average


def newton(loss, params, hparams, x, y, average, steps=12):
    """Newton's method on the mean over ranks of `loss` (averaged gradient and Hessian)."""
    flat, unravel = implicitfn.tree_ravel(params)
    for _ in range(steps):
        value = lambda v: loss(unravel(v), hparams, x, y)  # noqa: E731
        step = torch.linalg.solve(
            average(torch.func.hessian(value)(flat)), average(torch.func.grad(value)(flat))
        )
        flat = flat - step
    return unravel(flat)


def gradient_descent(loss, params, hparams, x, y, average, steps=150, lr=0.5):
    for _ in range(steps):
        gradient = torch.func.grad(loss)(params, hparams, x, y)
        params = {k: params[k] - lr * average(gradient[k]) for k in params}
    return params


# ---------------------------------------------------------------- what is compared


def scenarios(rank: int, world: int, distributed) -> dict[str, torch.Tensor]:
    """Every compared result. Keys starting with `shard:` belong to this rank's rows only."""
    out = {}
    average = averager(distributed)
    x, y, x_val, y_val = (shard(t, rank, world) for t in logistic_data())
    start, _ = logistic_start()

    @implicitfn.implicit_diff(
        implicitfn.stationarity(logistic_loss),
        adjoint=implicitfn.ImplicitAdjoint(
            solver=implicitfn.CG(max_steps=100, rtol=1e-13), distributed=distributed
        ),
    )
    def logistic_inner(params, hparams, x, y):
        return newton(logistic_loss, params, hparams, x, y, average)

    # implicit_diff + .backward(): gradients to the hyperparameters and to the training shard.
    log_decay = torch.linspace(-2.0, 0.0, 5, dtype=DTYPE).requires_grad_()
    hparams = {"log_decay": log_decay}
    x_leaf = x.clone().requires_grad_()
    w_star = logistic_inner(start, hparams, x_leaf, y)
    logistic_validation(w_star, hparams, x_val, y_val).backward()
    if distributed is not False:
        implicitfn.all_reduce_gradients(hparams)
    out["logistic/implicit_diff"] = log_decay.grad
    out["shard:logistic/implicit_diff d/dx"] = x_leaf.grad

    # hypergradient, with solvers that vmap over the operator (Dense, Jacobi-preconditioned CG).
    point = {k: v.detach() for k, v in w_star.items()}
    for name, solver in [
        ("dense", implicitfn.Dense()),
        ("cg_jacobi", implicitfn.CG(preconditioner="jacobi", probes=4, rtol=1e-13)),
    ]:
        gradient, info = logistic_hypergradient(
            point,
            {"log_decay": log_decay.detach()},
            (x, y, x_val, y_val),
            implicitfn.ImplicitAdjoint(solver=solver, distributed=distributed),
        )
        out[f"logistic/hypergradient {name}"] = gradient["log_decay"]
        out[f"logistic/hypergradient {name} steps"] = info.num_steps.to(DTYPE)

    # Forward mode: the derivative of w* along a direction of the hyperparameters.
    _, tangent = torch.func.jvp(
        lambda decay: logistic_inner(start, {"log_decay": decay}, x, y)["w"],
        (log_decay.detach(),),
        (torch.linspace(1.0, -1.0, 5, dtype=DTYPE),),
    )
    out["logistic/jvp"] = tangent

    # A small MLP: Gauss-Newton curvature, damped CG, an explicit process group.
    group = distributed if distributed is False else dist.new_group()
    average = averager(distributed, None if group is False else group)
    x, y, x_val, y_val = (shard(t, rank, world) for t in mlp_data())

    @implicitfn.implicit_diff(
        implicitfn.stationarity(MLP_LOSS),
        adjoint=implicitfn.ImplicitAdjoint(
            solver=implicitfn.CG(max_steps=200, rtol=1e-12),
            curvature=implicitfn.GaussNewton(),
            damping=1e-3,
            distributed=group,
        ),
    )
    def mlp_inner(params, hparams, x, y):
        return gradient_descent(MLP_LOSS, params, hparams, x, y, average)

    mlp_decay = torch.tensor([-3.0, -2.0], dtype=DTYPE, requires_grad=True)
    hparams = {"log_decay": mlp_decay}
    mlp_validation(mlp_inner(mlp_init(), hparams, x, y), hparams, x_val, y_val).backward()
    if group is not False:
        implicitfn.all_reduce_gradients(hparams, group=group)
    out["mlp/implicit_diff"] = mlp_decay.grad
    return {k: v.detach() for k, v in out.items()}


# ---------------------------------------------------------------- rank processes


def count_all_reduces(rank: int, world: int) -> dict[str, int]:
    """All-reduces of one `hypergradient` call with CG, and the solve's `num_steps`."""
    x, y, x_val, y_val = (shard(t, rank, world) for t in logistic_data())
    start, hparams = logistic_start()
    params = newton(logistic_loss, start, hparams, x, y, averager(True))
    adjoint = implicitfn.ImplicitAdjoint(solver=implicitfn.CG(rtol=1e-12), distributed=True)
    calls = []
    all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.shape)
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        _, info = logistic_hypergradient(params, hparams, (x, y, x_val, y_val), adjoint)
    finally:
        dist.all_reduce = all_reduce
    return {"all_reduces": len(calls), "num_steps": int(info.num_steps)}


def agreement_worker(rank: int, world: int, directory: pathlib.Path) -> None:
    torch.save(scenarios(rank, world, distributed=True), directory / f"rank{rank}.pt")
    torch.save(count_all_reduces(rank, world), directory / f"count{rank}.pt")


def failing_worker(rank: int, world: int, directory: pathlib.Path) -> None:
    """Rank 1 raises before the backward pass; rank 0 goes on and waits in an all-reduce."""
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    data = tuple(shard(t, rank, world) for t in logistic_data())
    logistic_hypergradient(*logistic_start(), data, implicitfn.ImplicitAdjoint(distributed=True))


WORKERS = {"agreement": agreement_worker, "failing": failing_worker}


def run_rank(worker: str, rank: int, world: int, directory: pathlib.Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=(directory / "store").as_uri(),  # a file store: no port to pick
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
    )
    try:
        WORKERS[worker](rank, world, directory)
    finally:
        dist.destroy_process_group()


def launch(worker: str, directory: pathlib.Path, timeout: float = LAUNCH_TIMEOUT_S):
    """Start the ranks and wait for them, never longer than `timeout`.

    **Returns:** `(exit codes, logs, seconds)`; a killed rank has a negative exit code.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [directory / f"rank{rank}.log" for rank in range(WORLD)]
    processes = []
    for rank, log in enumerate(logs):
        with open(log, "w") as handle:
            command = [sys.executable, __file__, worker, str(rank), str(WORLD), str(directory)]
            processes.append(
                subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
            )
    begin = time.monotonic()
    failed_at = None
    try:
        while any(p.poll() is None for p in processes):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in processes):
                failed_at = now
            if now - begin > timeout or (failed_at is not None and now - failed_at > GRACE_S):
                break
            time.sleep(0.05)
    finally:
        for process in processes:  # only the processes started here
            if process.poll() is None:
                process.kill()
                process.wait()
    seconds = time.monotonic() - begin
    return [p.returncode for p in processes], [log.read_text() for log in logs], seconds


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def reference():
    """One process on all the data."""
    return scenarios(0, 1, distributed=False)


def test_two_ranks_match_one_process_on_all_the_data(tmp_path, reference):
    codes, logs, seconds = launch("agreement", tmp_path)
    assert codes == [0] * WORLD, "\n".join(logs)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    worst = 0.0
    for name, expected in reference.items():
        for rank, results in enumerate(ranks):
            if name.startswith("shard:"):
                expected_here = shard(expected, rank, WORLD)
            else:
                expected_here = expected
                # Every rank computes the same hypergradient, bit for bit.
                assert torch.equal(results[name], ranks[0][name]), name
            torch.testing.assert_close(results[name], expected_here, **TOLERANCE, msg=name)
            worst = max(worst, float((results[name] - expected_here).abs().max()))
    print(f"two gloo ranks vs one process: max abs difference {worst:.3e} ({seconds:.1f} s)")
    # The documented cost: one all-reduce for the cotangent, one per CG step, one for the
    # measured residual, one for the hyperparameters' mixed product, one for the direct part.
    for rank in range(WORLD):
        count = torch.load(tmp_path / f"count{rank}.pt")
        assert count["all_reduces"] == count["num_steps"] + 4, count


def test_a_rank_that_raises_does_not_hang(tmp_path):
    codes, logs, seconds = launch("failing", tmp_path)
    assert "rank 1 fails on purpose" in logs[1]
    assert codes[1] != 0
    assert codes[0] != 0, logs[0]  # it raised (peer gone) or was killed after the grace period
    assert seconds < LAUNCH_TIMEOUT_S


def test_distributed_argument_is_checked_before_computing():
    condition = implicitfn.stationarity(logistic_loss)
    with pytest.raises(TypeError, match="distributed: expected False"):
        implicitfn.implicit_diff(condition, adjoint=implicitfn.ImplicitAdjoint(distributed="nccl"))
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")

    @implicitfn.implicit_diff(
        condition, adjoint=implicitfn.ImplicitAdjoint(distributed=True)
    )  # decorating needs no group yet
    def inner(params, hparams, x, y):
        raise AssertionError("the inner solve must not run")

    x, y, x_val, y_val = logistic_data()
    params, hparams = logistic_start()
    adjoint = implicitfn.ImplicitAdjoint(distributed=True)
    with pytest.raises(ValueError, match="init_process_group"):
        inner(params, hparams, x, y)
    with pytest.raises(ValueError, match="init_process_group"):
        logistic_hypergradient(params, hparams, (x, y, x_val, y_val), adjoint)
    with pytest.raises(ValueError, match="init_process_group"):
        implicitfn.all_reduce_gradients(hparams)


if __name__ == "__main__":  # one rank: WORKER RANK WORLD DIRECTORY
    worker_name, rank_arg, world_arg, directory_arg = sys.argv[1:5]
    run_rank(worker_name, int(rank_arg), int(world_arg), pathlib.Path(directory_arg))
