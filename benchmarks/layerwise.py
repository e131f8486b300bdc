r"""Layer-wise preconditioners for a network's backward solve: K-FAC, EKFAC and the exact blocks.

Issue 17 asked whether a preconditioner that captures a network's layers (K-FAC, or
Gauss-Newton blocks per layer) shortens the backward solve of the 9,610-decay MLP, where warm
start and a Nyström sketch gave 1.2-1.5x. This script answers on that very system: the
64-128-10 tanh MLP of `amortised.py` (digits, a decay per weight, all decays equal at 1e-3,
Gauss-Newton curvature) at its trained inner optimum. The backward system $Gv = \nabla_w
L_V$ is solved by `implicitfn.CG(preconditioner=...)` to each relative residual, and the
products are counted (`SolveInfo.num_steps`, the measured residual included). Every solution
is compared with a tight reference (CG to relative residual 1e-11).

Preconditioners, layer $l$ computing $s = a W + b$ (per example; $W$ is in x out):
- `kfac` (Martens & Grosse, 2015): the layer's block of the Gauss-Newton matrix
  $\frac1n\sum_i \tilde a_i\tilde a_i^\top \otimes U_iU_i^\top$ ($\tilde a = [a; 1]$,
  $U_i$ the square-root factor of the cross-entropy's Hessian, $\operatorname{diag}(\sqrt p)
  - p\sqrt p^\top$, carried back to the layer's pre-activations) is replaced by
  $A \otimes G$ with $A$, $G$ the means of the two factors, and inverted with the decay
  added in the factors' eigenbases, $(A\otimes G + \lambda I)^{-1}$;
- `ekfac` (George et al., 2018): the same eigenbases, the eigenvalues re-estimated example by
  example (the exact diagonal of the block in that basis);
- `blocks`: the exact diagonal blocks of the Gauss-Newton matrix, one dense block per layer
  (weights and bias together) from one product per parameter, Cholesky-factored: what K-FAC
  and EKFAC approximate, without the approximation, at the cost of the whole matrix.

The factors are computed from the network's activations, which this script knows (the MLP is
written out below), as a K-FAC implementation would by hooks on its layers.

    python benchmarks/layerwise.py           # ~1 min: 500 examples, rtol 1e-3 and 1e-6
    python benchmarks/layerwise.py --fast    # CI: 200 examples, 1e-3, damping 100x
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDict

import implicitfn

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # run as a script: siblings are modules
import amortised  # noqa: E402
from _harness import check_device, machine, synchronize  # noqa: E402

Preconditioner = Callable[[TensorDict], TensorDict]


def layers_of(params: TensorDict) -> list[tuple[str, str]]:
    """The (weight, bias) keys of the MLP of `amortised.py`, input layer first."""
    count = sum(1 for key in params.keys() if key.startswith("w"))
    return [(f"w{layer}", f"b{layer}") for layer in range(1, count + 1)]


def kronecker_factors(params: TensorDict, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer: the inputs with a 1 appended (n x in+1) and the output Hessian's square-root
    factor carried back to the pre-activations (n x out x classes), both scaled by n^-1/2."""
    layers, inputs = layers_of(params), [x]
    with torch.no_grad():
        for index, (w, b) in enumerate(layers):
            s = inputs[-1] @ params[w] + params[b]
            inputs.append(torch.tanh(s) if index < len(layers) - 1 else s)
        p = inputs[-1].softmax(-1)
        root = torch.diag_embed(p.sqrt()) - p[:, :, None] * p.sqrt()[:, None, :]
        backward = [root]  # d(outputs)/d(pre-activations)^T @ root, last layer first
        for index in range(len(layers) - 1, 0, -1):
            derivative = 1.0 - inputs[index] ** 2  # tanh'
            carried = torch.einsum("jo,noc->njc", params[layers[index][0]], backward[-1])
            backward.append(derivative[:, :, None] * carried)
        backward.reverse()
    scale = x.shape[0] ** -0.5
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    return [
        {"inputs": torch.cat([a, ones], 1) * scale, "roots": u * scale}
        for a, u in zip(inputs[:-1], backward, strict=True)
    ]


def eigenbasis_preconditioner(
    params: TensorDict, bases: list[tuple], damping: list[float]
) -> Preconditioner:
    """r -> per layer Q_a ((Q_a^T R Q_g) / (E + rho)) Q_g^T on R = [r_W; r_b]."""
    layers = layers_of(params)

    def apply(residual: TensorDict) -> TensorDict:
        out = {}
        for (w, b), (qa, qg, eigenvalues), rho in zip(layers, bases, damping, strict=True):
            joint = torch.cat([residual[w], residual[b][None]], 0)
            joint = qa @ ((qa.T @ joint @ qg) / (eigenvalues + rho)) @ qg.T
            out[w], out[b] = joint[:-1], joint[-1]
        ordered = {key: out[key] for key in residual.keys()}  # r's keys, order and device
        return TensorDict(ordered, batch_size=residual.batch_size, device=residual.device)

    return apply


def kfac(params: TensorDict, x: torch.Tensor, damping: list[float], eigen_corrected: bool):
    """K-FAC (or EKFAC) of every layer, inverted with `damping` added (one value per layer)."""
    bases = []
    for factor in kronecker_factors(params, x):
        a, u = factor["inputs"], factor["roots"]
        ea, qa = torch.linalg.eigh(a.T @ a)
        eg, qg = torch.linalg.eigh(torch.einsum("noc,npc->op", u, u))
        if eigen_corrected:  # the block's exact diagonal in the Kronecker eigenbasis
            # a and u carry n^-1/2 each: the sum over examples is n times their mean.
            along_a = (a @ qa) ** 2
            along_g = (torch.einsum("noc,ol->nlc", u, qg) ** 2).sum(-1)
            eigenvalues = x.shape[0] * along_a.T @ along_g
        else:
            eigenvalues = ea.clamp(min=0)[:, None] * eg.clamp(min=0)[None, :]
        bases.append((qa, qg, eigenvalues))
    return eigenbasis_preconditioner(params, bases, damping)


def kfac_agreement(
    params: TensorDict, x: torch.Tensor, operator: Any, decays: list[float], seed: int = 0
) -> list[float]:
    """Per layer, the cosine between the Gauss-Newton block's action and undamped K-FAC's
    (each plus the decay) on a random direction within the layer."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    cosines = []
    for (w, b), factor, decay in zip(
        layers_of(params), kronecker_factors(params, x), decays, strict=True
    ):
        a, u = factor["inputs"], factor["roots"]
        direction = params.apply(torch.zeros_like)
        for key in (w, b):
            direction[key] = torch.randn(
                params[key].shape, generator=generator, dtype=x.dtype, device=x.device
            )
        product = operator.mv(direction)
        exact = torch.cat([product[w], product[b][None]], 0)
        joint = torch.cat([direction[w], direction[b][None]], 0)
        approximate = (a.T @ a) @ joint @ torch.einsum("noc,npc->op", u, u) + decay * joint
        cosines.append(float((exact * approximate).sum() / (exact.norm() * approximate.norm())))
    return cosines


def exact_blocks(operator: Any, params: TensorDict, chunk: int = 128) -> Preconditioner:
    """The Cholesky factors of the Gauss-Newton matrix's diagonal blocks, one per layer (from
    the whole matrix: one product per parameter)."""
    matrix = operator.as_matrix(chunk_size=chunk)
    flat, unravel = implicitfn.tree_ravel(params)
    positions = unravel(torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device))
    factors = []
    for keys in layers_of(params):
        index = torch.cat([positions[k].reshape(-1) for k in keys]).long()
        block = matrix[index][:, index]
        factors.append((index, torch.linalg.cholesky(0.5 * (block + block.T))))

    def apply(residual: TensorDict) -> TensorDict:
        vector = implicitfn.tree_ravel(residual)[0]
        result = torch.zeros_like(vector)
        for index, factor in factors:
            result[index] = torch.cholesky_solve(vector[index, None], factor)[:, 0]
        return unravel(result)

    return apply


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="CI: 200 examples, rtol 1e-3")
    parser.add_argument("--rtols", default=None, help="comma-separated (default 1e-3,1e-6)")
    parser.add_argument(
        "--damping",
        type=lambda text: [float(t) for t in text.split(",")],
        default=None,
        help="K-FAC's damping as multiples of the decay, comma-separated (default 1,10,100; "
        "--fast: 100)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    args = parser.parse_args()
    device = check_device(parser, args.device)
    torch.set_num_threads(args.threads)
    rtols = [float(t) for t in (args.rtols or ("1e-3" if args.fast else "1e-3,1e-6")).split(",")]
    args.damping = args.damping or ([100.0] if args.fast else [1.0, 10.0, 100.0])

    problem = amortised.classifier_problem("mlp", 128, args.fast, device)
    # The problem's training data, drawn again as classifier_problem draws it (same seed).
    x, labels, _, _ = amortised.digits(*((200, 200) if args.fast else (500, 500)), device)
    params = problem.train(problem.params, problem.hparams)
    decays = [float(problem.hparams[w].exp().mean()) for w, _ in layers_of(params)]
    operator = implicitfn.GaussNewton().linearize(problem.inner, params, problem.hparams)
    rhs = torch.func.grad(problem.outer)(params, problem.hparams)
    reference, info = implicitfn.CG(max_steps=50_000, rtol=1e-11).solve(operator, rhs)
    if info.failed:
        raise SystemExit(f"the reference solve failed: {info.outcome_names()}")
    print(machine(args.threads))
    print(
        f"MLP 64-128-10, {x.shape[0]} examples, 9,610 weights, decays {decays[0]:.0e}; "
        f"reference: {int(info.num_steps)} CG products to relative residual 1e-11"
    )
    with torch.no_grad():
        probabilities = problem.inner.predict(params, problem.hparams).softmax(-1)
    agreement = ", ".join(f"{c:.2f}" for c in kfac_agreement(params, x, operator, decays))
    print(
        f"training accuracy {float((probabilities.argmax(-1) == labels).double().mean()):.3f}, "
        f"mean top probability {float(probabilities.max(-1).values.mean()):.2f}; "
        f"K-FAC's block action vs the exact one, cosine per layer: {agreement}\n"
    )

    builders: dict[str, Callable[[], Preconditioner | None]] = {"none": lambda: None}
    for name, corrected in (("kfac", False), ("ekfac", True)):
        for factor in args.damping:  # K-FAC's damping is tuned in practice: a sweep
            damping = [factor * decay for decay in decays]
            builders[f"{name}, damping {factor:g}x decay"] = lambda d=damping, c=corrected: kfac(
                params, x, d, eigen_corrected=c
            )
    builders["exact blocks"] = lambda: exact_blocks(operator, params)
    print("| preconditioner | build s | build products | rtol | CG products | vs none | error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    baseline: dict[float, int] = {}
    for name, build in builders.items():
        synchronize()
        started = time.perf_counter()
        preconditioner = build()
        synchronize()
        built = time.perf_counter() - started
        setup = sum(t.numel() for t in params.values()) if name == "exact blocks" else 0
        for rtol in rtols:
            solver = implicitfn.CG(max_steps=5000, rtol=rtol, preconditioner=preconditioner)
            solution, info = solver.solve(operator, rhs)
            steps = int(info.num_steps)
            baseline.setdefault(rtol, steps)
            error = implicitfn.tree_norm(implicitfn.tree_axpy(-1.0, reference, solution)) / (
                implicitfn.tree_norm(reference)
            )
            print(
                f"| {name} | {built:.2f} | {setup:,} | {rtol:.0e} | {steps} | "
                f"{baseline[rtol] / steps:.2f}x | {float(error):.1e} |"
            )


if __name__ == "__main__":
    main()
