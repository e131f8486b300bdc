"""Curvature products on an MLP: forward-over-reverse vs reverse-over-reverse Hessian vs Gauss-Newton.

Prints the time of one product (after linearising, and including the linearisation amortised
over k products) and a vmapped batch of products against a Python loop, as ratios measured in
the same run. Run: `python benchmarks/hessian_modes.py [--threads 1] [--repeats 20]`, or with
`--fast` (3 repeats, 4 vectors: CI, a few seconds).
"""

from __future__ import annotations

import argparse

import _harness as H
import torch
from sklearn.datasets import load_digits
from tensordict import TensorDict
from tqdm import tqdm

import implicitfn


def digits_mlp(hidden: int, device: str = "cpu"):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    gen = torch.Generator().manual_seed(0)
    params = TensorDict(
        {
            "w1": torch.randn(64, hidden, generator=gen) / 8.0,
            "b1": torch.zeros(hidden),
            "w2": torch.randn(hidden, 10, generator=gen) / hidden**0.5,
            "b2": torch.zeros(10),
        }
    )
    # Leaf by leaf: TensorDict.to(device) would also set its device, changing its pytree spec.
    params, x, y = params.apply(lambda t: t.to(device)), x.to(device), y.to(device)
    hparams = params.apply(lambda t: torch.full_like(t, -4.0))

    def predict(p, h, x, y):
        return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def output_loss(logits, h, x, y):
        return torch.nn.functional.cross_entropy(logits, y)

    def penalty(p, h, x, y):
        return 0.5 * sum((h[k].exp() * p[k] ** 2).sum() for k in p.keys())

    return implicitfn.CompositeLoss(predict, output_loss, penalty), params, hparams, (x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="vectors in the vmapped batch")
    parser.add_argument("--fast", action="store_true", help="3 repeats, 4 vectors (CI)")
    args = parser.parse_args()
    H.check_device(parser, args.device)
    if args.fast:
        args.repeats, args.batch = 3, 4
    torch.set_num_threads(args.threads)

    loss, params, hparams, data = digits_mlp(args.hidden, args.device)
    n = implicitfn.tree_ravel(params)[0].numel()
    vector = params.apply(torch.randn_like)
    vectors = params.apply(lambda t: torch.randn(args.batch, *t.shape, device=t.device))
    vectors = vectors.auto_batch_size_(1)
    curvatures = {
        "hessian forward-over-reverse": implicitfn.Hessian("forward-over-reverse"),
        "hessian reverse-over-reverse": implicitfn.Hessian("reverse-over-reverse"),
        "gauss-newton": implicitfn.GaussNewton(),
    }
    gradient = torch.func.grad(loss)

    def timed(fn) -> float:  # one untimed call first
        return H.median_time(fn, args.repeats, warm_up=True)

    grad_time = timed(lambda: gradient(params, hparams, *data))
    print(
        f"MLP on digits: {n} parameters, {data[0].shape[0]} examples, torch threads = {args.threads}"
    )
    print(f"one training-loss gradient: {grad_time * 1e3:.2f} ms\n")

    rows = []
    for name, curvature in tqdm(curvatures.items(), desc="curvatures"):
        operator = curvature.linearize(loss, params, hparams, *data)
        linearize = timed(lambda c=curvature: c.linearize(loss, params, hparams, *data))
        product = timed(lambda op=operator: op.mv(vector))
        batched = timed(lambda op=operator: torch.func.vmap(op.mv)(vectors))
        looped = timed(lambda op=operator: [op.mv(vectors[i]) for i in range(args.batch)])
        rows.append((name, linearize, product, batched, looped))

    base = rows[0][2]
    header = f"{'curvature':30s} {'linearise':>10s} {'product':>9s} {'product':>9s} {'10 prods':>9s} {'vmap':>9s} {'loop':>9s} {'loop/vmap':>9s}"
    units = f"{'':30s} {'ms':>10s} {'ms':>9s} {'/ grad':>9s} {'/ fwd-rev':>9s} {'ms':>9s} {'ms':>9s} {'':>9s}"
    print(header)
    print(units)
    for name, linearize, product, batched, looped in rows:
        ten = (linearize + 10 * product) / (rows[0][1] + 10 * base)
        print(
            f"{name:30s} {linearize * 1e3:10.2f} {product * 1e3:9.2f} {product / grad_time:9.2f} "
            f"{ten:9.2f} {batched * 1e3:9.2f} {looped * 1e3:9.2f} {looped / batched:9.2f}"
        )
    fwd, rev = rows[0], rows[1]
    print(
        f"\nreverse-over-reverse / forward-over-reverse, 10 products incl. linearisation: "
        f"{(rev[1] + 10 * rev[2]) / (fwd[1] + 10 * fwd[2]):.2f}"
    )


if __name__ == "__main__":
    main()
