"""Data-parallel hypergradients: per-feature weight decay, with the data sharded over ranks.

Logistic regression on scikit-learn's breast-cancer data (569 examples, 30 features) with one
weight decay per feature, tuned on a validation split by hypergradient descent. The training and
validation rows are split evenly over the ranks of a `torch.distributed` process group:

- the inner solve is L-BFGS on the mean over ranks of the local losses (each closure averages
  the loss and the gradients with `all_reduce`, the way DDP does), so every rank holds the same
  weights w*;
- `implicit_diff(..., distributed=True)` averages the backward pass over the ranks: the
  cotangent, every Hessian-vector product of the CG solve and the mixed product;
- `implicitfn.all_reduce_gradients` averages the direct part of the hypergradient.

Every rank ends each step with the hypergradient of one process on all the data. Rank 0 checks
it: at the last step it recomputes the hypergradient in one process on the full data and prints
the largest difference.

    torchrun --nproc_per_node=2 examples/distributed_hypergradient.py      # gloo on CPU
    torchrun --nproc_per_node=2 examples/distributed_hypergradient.py --backend nccl  # one GPU per rank
    python examples/distributed_hypergradient.py --fast     # starts 2 gloo processes itself (CI)
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import implicitfn

DTYPE = torch.float64  # so that the one-process check can be tight


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few outer steps (CI, < 30 s)")
    parser.add_argument("--outer-steps", type=int, default=30, help="hypergradient steps")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam step on log(decay)")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument(
        "--nproc", type=int, default=2, help="ranks to start when not launched by torchrun"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout (s)")
    args = parser.parse_args(argv)
    if args.fast:
        args.outer_steps = 3
    return args


# ---------------------------------------------------------------- the bilevel problem


def train_loss(params, hparams, x, y):
    """Mean cross-entropy on this rank's rows plus the per-feature L2 penalty."""
    logits = x @ params["w"] + params["b"]
    penalty = 0.5 * (hparams["log_decay"].exp() * params["w"] ** 2).sum()
    return F.binary_cross_entropy_with_logits(logits, y) + penalty


def validation_loss(params, hparams, x, y):
    return F.binary_cross_entropy_with_logits(x @ params["w"] + params["b"], y)


def load_data(device: torch.device):
    """Standardised features, split 50/50 into training and validation (the same on every rank)."""
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    x = torch.tensor(features, dtype=DTYPE)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(labels, dtype=DTYPE)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order].to(device), y[order].to(device)
    n = 280  # training and validation rows each: a multiple of the rank count (1, 2, 4, 8)
    return x[:n], y[:n], x[n : 2 * n], y[n : 2 * n]


def average(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks, with plain torch.distributed (what DDP does to gradients)."""
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / dist.get_world_size()


def lbfgs(params, hparams, x, y):
    """L-BFGS on the mean over ranks of the training loss (identical steps on every rank)."""
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    optimizer = torch.optim.LBFGS(
        list(params.values()),
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = train_loss(params, hparams, x, y)
        loss.backward()
        for value in params.values():
            value.grad = average(value.grad)
        return average(loss.detach())

    optimizer.step(closure)
    return {k: v.detach() for k, v in params.items()}


# ---------------------------------------------------------------- one rank


def run(rank: int, world: int, args: argparse.Namespace, device: torch.device) -> None:
    x_train, y_train, x_val, y_val = load_data(device)
    shard = slice(rank * len(x_train) // world, (rank + 1) * len(x_train) // world)
    x, y, xv, yv = x_train[shard], y_train[shard], x_val[shard], y_val[shard]

    log_decay = torch.full((x.shape[1],), -2.0, dtype=DTYPE, device=device, requires_grad=True)
    hparams = {"log_decay": log_decay}
    optimizer = torch.optim.Adam([log_decay], lr=args.lr)
    params = {
        "w": torch.zeros(x.shape[1], dtype=DTYPE, device=device),
        "b": torch.zeros((), dtype=DTYPE, device=device),
    }
    solves = []  # the SolveInfo of each backward solve
    fit = implicitfn.implicit_diff(
        implicitfn.stationarity(train_loss),
        adjoint=implicitfn.ImplicitAdjoint(
            solver=implicitfn.CG(max_steps=200, rtol=1e-10),
            callback=solves.append,
            distributed=True,
        ),  # average the backward pass over the ranks
    )(lbfgs)
    if rank == 0:
        print(f"{world} ranks ({dist.get_backend()}), {len(x)} training rows each")
    for step in range(1, args.outer_steps + 1):
        optimizer.zero_grad()
        w_star = fit(params, hparams, x, y)
        loss = validation_loss(w_star, hparams, xv, yv)
        loss.backward()  # the backward CG solve: all-reduces over the ranks
        implicitfn.all_reduce_gradients(hparams)  # the direct part (here zero) and all of it
        full_loss = average(loss.detach())
        if rank == 0:
            info = solves[-1]
            print(
                f"step {step:3d}  validation loss {float(full_loss):.5f}  "
                f"|hypergradient| {float(log_decay.grad.norm()):.3e}  "
                f"CG steps {int(info.num_steps)} (all-reduces {int(info.num_steps) + 2})"
            )
        if step == args.outer_steps:
            check(rank, hparams, w_star, x_train, y_train, x_val, y_val)
        optimizer.step()
        params = {k: v.detach() for k, v in w_star.items()}  # warm start the next inner solve


def check(rank, hparams, w_star, x_train, y_train, x_val, y_val) -> None:
    """Rank 0: the same hypergradient from one process on all the data, at the same w*."""
    if rank != 0:
        return
    point = {k: v.detach() for k, v in w_star.items()}
    single, _ = implicitfn.hypergradient(
        train_loss,
        validation_loss,
        point,
        {"log_decay": hparams["log_decay"].detach()},
        inner_args=(x_train, y_train),
        outer_args=(x_val, y_val),
        adjoint=implicitfn.ImplicitAdjoint(solver=implicitfn.CG(max_steps=200, rtol=1e-10)),
    )
    difference = float((single["log_decay"] - hparams["log_decay"].grad).abs().max())
    scale = float(single["log_decay"].abs().max())
    print(
        f"ranks vs one process on all the data: max abs difference {difference:.2e} (of {scale:.2e})"
    )
    if not difference <= 1e-9 * max(scale, 1.0):
        raise SystemExit("the data-parallel hypergradient does not match one process")


def rank_main(rank: int, world: int, args: argparse.Namespace, init_method: str | None) -> None:
    """Join the process group (from torchrun's environment, or `init_method`), run, leave."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    dist.init_process_group(
        args.backend,
        init_method=init_method,
        rank=rank if init_method else -1,
        world_size=world if init_method else -1,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    try:
        run(dist.get_rank(), dist.get_world_size(), args, device)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:  # started by torchrun: it set RANK, WORLD_SIZE, MASTER_ADDR, ...
        rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return
    # Started as a plain script: start the ranks here, meeting through a file store.
    with tempfile.TemporaryDirectory() as directory:
        init_method = (pathlib.Path(directory) / "store").as_uri()
        mp.spawn(rank_main, args=(args.nproc, args, init_method), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
