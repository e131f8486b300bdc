"""GPU checks, in one go, whenever a GPU is lent (not part of CI; `benchmarks/gpu.sh` runs it).

1. Hypergradients on the device against CPU float64: logistic regression and a tanh MLP on
   digits, a decay per weight, CG to 1e-8 (exact Hessian for the convex model, Gauss-Newton
   for the MLP), float32 and float64 on the device; prints the relative error to CPU float64.
2. vmapped products: 64 Gauss-Newton and exact-Hessian products at once (`torch.func.vmap`
   over the operator) against a loop, equal answers and the time of each.
3. The compiled reverse pass (`compile="reduce-overhead"`, CUDA graphs) against eager: equal
   answers, first-call (compile) time and the time per call.

    python benchmarks/gpu_checks.py --device cuda     # well under 5 minutes on one GPU
    python benchmarks/gpu_checks.py --device cpu      # the same code on the CPU (a dry run)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from tensordict import TensorDict

import implicitfn


def problem(hidden: int | None, dtype: torch.dtype, device: str):
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=dtype, device=device)
    y = torch.tensor(labels, device=device)
    generator = torch.Generator().manual_seed(0)
    if hidden is None:
        shapes = {"w": (64, 10), "b": (10,)}
    else:
        shapes = {"w1": (64, hidden), "b1": (hidden,), "w2": (hidden, 10), "b2": (10,)}
    params = TensorDict(
        {
            k: 0.1 * torch.randn(s, generator=generator, dtype=torch.float64)
            for k, s in shapes.items()
        }
    ).to(device=device, dtype=dtype)
    hparams = params.apply(lambda t: torch.full_like(t, -4.0))

    def predict(w, h, inputs):
        if hidden is None:
            return inputs @ w["w"] + w["b"]
        return torch.tanh(inputs @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]

    inner = implicitfn.CompositeLoss(
        predict=lambda w, h: predict(w, h, x[:1000]),
        output_loss=lambda out, h: F.cross_entropy(out, y[:1000]),
        penalty=lambda w, h: 0.5 * sum((h[k].exp() * w[k] ** 2).sum() for k in w.keys()),
    )

    def outer(w, h):
        return F.cross_entropy(predict(w, h, x[1000:]), y[1000:])

    params = implicitfn.minimize(inner, params, hparams, max_steps=500, tol=1e-3)
    return inner, outer, params, hparams


def flat(tree) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double().cpu() for t in tree.values(True, True)])


def timed(fn, repeats: int = 10) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    torch.set_num_threads(1)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {args.device} ({name}); torch {torch.__version__}")

    print("\n1. hypergradient on the device vs CPU float64 (relative error)")
    for hidden, curvature in ((None, implicitfn.Hessian()), (128, implicitfn.GaussNewton())):
        results = {}
        for dtype, device in (
            (torch.float64, "cpu"),
            (torch.float64, args.device),
            (torch.float32, args.device),
        ):
            inner, outer, params, hparams = problem(hidden, dtype, device)
            start = time.perf_counter()
            adjoint = implicitfn.ImplicitAdjoint(
                solver=implicitfn.CG(max_steps=2000, rtol=1e-8 if dtype == torch.float64 else 1e-5),
                curvature=curvature,
            )
            grad, info = implicitfn.hypergradient(inner, outer, params, hparams, adjoint=adjoint)
            results[(dtype, device)] = (flat(grad), time.perf_counter() - start, info)
        reference = results[(torch.float64, "cpu")][0]
        for (dtype, device), (grad, seconds, info) in results.items():
            error = float((grad - reference).norm() / reference.norm())
            print(
                f"  {'logreg' if hidden is None else 'mlp'} {device} {dtype}: "
                f"rel. error {error:.1e}, {seconds * 1e3:.1f} ms, {info}"
            )

    print("\n2. 64 vmapped products vs a loop (MLP, float32)")
    inner, outer, params, hparams = problem(128, torch.float32, args.device)
    condition = implicitfn.stationarity(inner)
    vectors = torch.randn(64, *flat(params).shape, device=args.device)
    for curvature in (implicitfn.Hessian(), implicitfn.GaussNewton()):
        operator = condition.linearize(curvature, params, hparams)
        unravel = implicitfn.tree_ravel(params)[1]

        def product(v, operator=operator, unravel=unravel):
            return implicitfn.tree_ravel(operator.mv(unravel(v)))[0]

        batched = torch.func.vmap(product)(vectors)
        looped = torch.stack([product(v) for v in vectors])
        error = float((batched - looped).norm() / looped.norm())
        t_vmap = timed(lambda product=product: torch.func.vmap(product)(vectors))
        t_loop = timed(lambda product=product: [product(v) for v in vectors], repeats=3)
        print(
            f"  {type(curvature).__name__}: vmap vs loop rel. diff {error:.1e}; "
            f"vmap {t_vmap * 1e3:.1f} ms, loop {t_loop * 1e3:.1f} ms ({t_loop / t_vmap:.1f}x)"
        )

    print("\n3. compiled reverse pass (CUDA graphs where on CUDA) vs eager, CG-10, logreg float32")
    inner, outer, params, hparams = problem(None, torch.float32, args.device)
    solver = implicitfn.CG(max_steps=10, rtol=0)
    mode = "reduce-overhead" if args.device.startswith("cuda") else "default"
    eager = implicitfn.ImplicitAdjoint(solver=solver, inner_rtol=None)
    compiled = implicitfn.ImplicitAdjoint(solver=solver, inner_rtol=None, compile=mode)
    start = time.perf_counter()
    first, _ = implicitfn.hypergradient(inner, outer, params, hparams, adjoint=compiled)
    compile_s = time.perf_counter() - start
    reference, _ = implicitfn.hypergradient(inner, outer, params, hparams, adjoint=eager)
    diff = float((flat(first) - flat(reference)).norm() / flat(reference).norm())
    t_eager = timed(lambda: implicitfn.hypergradient(inner, outer, params, hparams, adjoint=eager))
    t_comp = timed(
        lambda: implicitfn.hypergradient(inner, outer, params, hparams, adjoint=compiled)
    )
    print(
        f"  mode {mode}: first call {compile_s:.1f} s; rel. diff {diff:.1e}; eager "
        f"{t_eager * 1e3:.2f} ms, compiled {t_comp * 1e3:.2f} ms ({t_eager / t_comp:.1f}x); "
        f"fallbacks: {compiled.compile_fallbacks or 'none'}"
    )


if __name__ == "__main__":
    main()
