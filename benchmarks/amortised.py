"""Amortised hypergradients: the backward solve reused across the outer steps of a tuning run.

A hyperparameter optimisation takes hundreds of hypergradients of systems that move little from
one outer step to the next, yet torchopt, hypertorch and jaxopt start CG from zero every time.
This benchmark runs the same 100-outer-step optimisation (normalised gradient descent on
log-decays) with each way of
solving the backward system, side by side in one process, and counts what each costs:

- `cg-zero`: CG from zero at every step (what the peers do);
- `cg-warm`: CG started from the previous step's solution (`ImplicitAdjoint(warm_start=True)`);
- `nystrom`: CG preconditioned by a randomized Nyström sketch built once and rebuilt only when
  the solves grow (`ImplicitAdjoint(preconditioner=NystromPreconditioner(rank))`);
- `nystrom-warm`: both;
- `nystrom-penalty-warm`: `nystrom-warm` whose sketch is taken after scaling the system by the
  diagonal of the penalty's Hessian (`NystromPreconditioner(rank, scaling="penalty")`): the
  regime where per-weight decays have spread over orders of magnitude (`--spread`);
- `cg-warm-schedule`: inexact on purpose, `cg-warm` with a tolerance falling geometrically from
  30x `--rtol` to `--rtol` over the first half of the run (`hyperopt.GeometricTolerance`, as
  `HyperOptimizer(tolerance_schedule=...)` does); its early cosines are below 0.99 by design,
  so it is judged by its final validation loss only.

The methods advance in lockstep (one outer step each, in a rotating order), so that load from
other processes hits them alike. Every method stops CG at the same relative residual (`--rtol`, chosen per problem so that CG
from zero meets the accuracy target); at every outer step (or every `--check-every`) its
hypergradient is compared with a tight reference solve at the same point (CG to relative
residual 1e-9 from the method's own solution; not counted), and the smallest cosine is
reported: every method must stay at cosine >= 0.99. Each method follows its own trajectory,
so the final validation losses are compared too.

Problems (float64 unless said; one torch thread unless `--threads`):
- `logreg`: logistic regression on scikit-learn's digits (500 training / 500 validation
  images), one weight decay per weight: 650 hyperparameters. Inner: L-BFGS, warm-started.
- `mlp`: a 64-128-10 tanh MLP on the same data, one decay per weight: 9,610
  hyperparameters; Gauss-Newton curvature (the exact Hessian is indefinite at the
  warm-started inner points, where CG stops on negative curvature). Inner: L-BFGS, warm-started.
- `deconv`: a 1,048,576-sample signal (generated: piecewise constant plus a smooth part)
  blurred by a 3-tap filter plus noise; the inner problem recovers it with one decay per
  sample (ridge regression with a per-weight penalty whose design is the blur): 1,048,576
  hyperparameters, float32 (reference to relative residual 1e-5). Inner: CG, warm-started
  (the problem is quadratic).

Reported per problem and method: total Hessian-vector products (`SolveInfo.num_steps`:
every product of the solve, the measured residual and the sketches included), the wall time
spent in hypergradients (`wall_s`) and in the whole run without the reference solves
(`total_s`: inner training, hypergradients, outer steps), the final validation
loss, the smallest cosine; and the ratios against `cg-zero`.

    python benchmarks/amortised.py                      # all three problems, minutes
    python benchmarks/amortised.py --fast               # CI: a few outer steps, small sizes
    python benchmarks/amortised.py --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from tensordict import TensorDict
from tqdm.auto import tqdm

import implicitfn
from implicitfn import hyperopt

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # run as a script: the harness is a sibling
from _harness import check_device, machine, synchronize  # noqa: E402

DTYPE = torch.float64
METHODS = (
    "cg-zero",
    "cg-warm",
    "nystrom",
    "nystrom-warm",
    "nystrom-penalty-warm",
    "cg-warm-schedule",
)


@dataclasses.dataclass
class Problem:
    """A bilevel problem: `inner(w, h)`, `outer(w, h)`, `train(w, h) -> w*` (warm-started from
    `w`), initial `params` and `hparams` (log-decays), and the backward solve's settings."""

    name: str
    inner: Callable[[Any, Any], torch.Tensor]
    outer: Callable[[Any, Any], torch.Tensor]
    train: Callable[[Any, Any], Any]
    params: Any
    hparams: Any
    rtol: float  # the relative residual every method stops at
    rank: int  # of the Nyström sketch
    outer_lr: float
    curvature: implicitfn.AbstractCurvature = implicitfn.Hessian()


def leaves_of(tree: Any) -> list[torch.Tensor]:
    return list(tree.values(True, True)) if isinstance(tree, TensorDict) else [tree]


def lbfgs(loss: Callable[[Any], torch.Tensor], start: TensorDict, steps: int) -> TensorDict:
    """L-BFGS (strong Wolfe) on `loss` from a copy of `start`, at most `steps` iterations, to a
    gradient below 1e-6 (max-abs): w*(lambda) then hardly depends on the path that led to it,
    and runs that differ by rounding-sized hypergradient errors stay comparable."""
    params = start.clone().requires_grad_(True)
    tensors = leaves_of(params)
    optimizer = torch.optim.LBFGS(
        tensors,
        lr=1,
        max_iter=steps,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=0,
    )

    def closure():
        optimizer.zero_grad()
        value = loss(params)
        value.backward()
        return value

    optimizer.step(closure)
    return params.detach()


def digits(train: int, val: int, device: str, seed: int = 0):
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=DTYPE)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    a, b = order[:train], order[train : train + val]
    return [t.to(device) for t in (x[a], y[a], x[b], y[b])]


def classifier_problem(name: str, hidden: int | None, fast: bool, device: str) -> Problem:
    """Logistic regression (`hidden=None`) or a tanh MLP on digits, a decay per weight."""
    x, y, x_val, y_val = digits(*((200, 200) if fast else (500, 500)), device)
    generator = torch.Generator().manual_seed(0)
    if hidden is None:
        params = TensorDict(w=torch.zeros(64, 10, dtype=DTYPE), b=torch.zeros(10, dtype=DTYPE))
    else:
        params = TensorDict(
            w1=torch.randn(64, hidden, generator=generator, dtype=DTYPE) / 8,
            b1=torch.zeros(hidden, dtype=DTYPE),
            w2=torch.randn(hidden, 10, generator=generator, dtype=DTYPE) / math.sqrt(hidden),
            b2=torch.zeros(10, dtype=DTYPE),
        )
    params = params.to(device)

    def predict(w, inputs):
        if hidden is None:
            return inputs @ w["w"] + w["b"]
        return torch.tanh(inputs @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]

    # Stated as a composite loss so that the MLP can use the Gauss-Newton matrix: its exact
    # Hessian is indefinite at the warm-started inner points (CG stops on negative curvature).
    inner = implicitfn.CompositeLoss(
        predict=lambda w, h: predict(w, x),
        output_loss=lambda logits, h: F.cross_entropy(logits, y),
        penalty=lambda w, h: 0.5 * sum((h[k].exp() * w[k] ** 2).sum() for k in w.keys()),
    )

    def outer(w, h):
        return F.cross_entropy(predict(w, x_val), y_val)

    def train(w, h):
        return lbfgs(lambda p: inner(p, h), w, steps=50 if fast else 500)

    hparams = params.apply(lambda t: torch.full_like(t, math.log(1e-3)))
    # CG from zero meets cosine >= 0.99 at these residuals (the MLP needs far tighter, #16).
    rtol = 1e-2 if hidden is None else 1e-3
    curvature = implicitfn.Hessian() if hidden is None else implicitfn.GaussNewton()
    return Problem(name, inner, outer, train, params, hparams, rtol, 50, 0.05, curvature)


def deconvolution_problem(fast: bool, device: str) -> Problem:
    """Recover a blurred, noisy signal with a decay per sample: ridge regression whose design
    is a 3-tap blur (periodic, symmetric), with 2^20 weights and as many hyperparameters, in
    float32 (a product is then a few milliseconds)."""
    size = 2**14 if fast else 2**20
    generator = torch.Generator().manual_seed(0)
    positions = torch.linspace(0, 1, size, dtype=torch.float32)
    jumps = torch.rand(64, generator=generator, dtype=torch.float32)
    truth = jumps[(positions * 63.999).long()] + 0.3 * torch.sin(40 * positions)

    def blur(signal):  # the 3-tap filter [1, 2, 1] / 4, periodic
        return 0.5 * signal + 0.25 * (torch.roll(signal, 1) + torch.roll(signal, -1))

    observed = blur(truth) + 0.05 * torch.randn(size, generator=generator, dtype=torch.float32)
    held_out = torch.rand(size, generator=generator) < 0.5  # outer loss on half the samples
    truth, observed, held_out = truth.to(device), observed.to(device), held_out.to(device)

    # Stated as a composite loss so that the penalty (the decays) can scale the preconditioner.
    inner = implicitfn.CompositeLoss(
        predict=lambda w, h: blur(w),
        output_loss=lambda out, h: 0.5 * ((out - observed) ** 2).sum(),
        penalty=lambda w, h: 0.5 * (h.exp() * w**2).sum(),
    )

    def outer(w, h):
        return ((w - truth)[held_out] ** 2).mean()

    def train(w, h):  # the normal equations (K^T K + diag(e^h)) w = K^T y, by CG from w
        decay = h.exp()
        rhs = blur(observed)
        x = w.clone()
        r = rhs - blur(blur(x)) - decay * x
        p, rr = r.clone(), r @ r
        for _ in range(500):
            if rr.sqrt() <= 1e-6 * rhs.norm():
                break
            ap = blur(blur(p)) + decay * p
            alpha = rr / (p @ ap)
            x, r = x + alpha * p, r - alpha * ap
            rr, previous = r @ r, rr
            p = r + (rr / previous) * p
        return x

    hparams = torch.full((size,), math.log(1e-3), dtype=torch.float32, device=device)
    return Problem(
        "deconv", inner, outer, train, observed.clone(), hparams, 1e-2, rank=50, outer_lr=0.1
    )


def spread_decays(hparams: Any, sigma: float) -> Any:
    """Log-decays plus `sigma` times seeded standard normal noise: decays that have moved apart
    by orders of magnitude, as after many hyper-steps of a per-weight tuning run."""
    generator = torch.Generator().manual_seed(1)

    def spread(t: torch.Tensor) -> torch.Tensor:
        return t + sigma * torch.randn(t.shape, generator=generator).to(t)

    return hparams.apply(spread) if isinstance(hparams, TensorDict) else spread(hparams)


def adjoint_for(method: str, problem: Problem) -> implicitfn.ImplicitAdjoint:
    preconditioner = None
    if "nystrom" in method:
        scaling = "penalty" if "penalty" in method else None
        preconditioner = implicitfn.NystromPreconditioner(rank=problem.rank, scaling=scaling)
    return implicitfn.ImplicitAdjoint(
        solver=implicitfn.CG(max_steps=5000, rtol=problem.rtol),
        curvature=problem.curvature,
        warm_start="warm" in method,
        preconditioner=preconditioner,
        inner_rtol=None,  # the same products for every method: none spent on that check
    )


def cosine(a: Any, b: Any) -> float:
    fa = torch.cat([t.reshape(-1) for t in leaves_of(a)])
    fb = torch.cat([t.reshape(-1) for t in leaves_of(b)])
    return float(fa @ fb / (fa.norm() * fb.norm()))


class Run:
    """One method's tuning run, advanced one outer step at a time."""

    def __init__(self, problem: Problem, method: str, outer_steps: int) -> None:
        self.problem, self.method = problem, method
        self.adjoint = adjoint_for(method, problem)
        # The reference starts from its own last solution: tight, and cheaper than from zero.
        tight = 1e-9 if problem.params.dtype == torch.float64 else 1e-5
        self.reference = implicitfn.ImplicitAdjoint(
            solver=implicitfn.CG(max_steps=20000, rtol=tight),
            curvature=problem.curvature,
            inner_rtol=None,
            warm_start=True,
            # float32 may stagnate just above 1e-5 on a badly conditioned (--spread) system:
            # still 1000x tighter than the methods' tolerance, so good enough to compare with.
            on_failure="warn",
        )
        self.hparams = problem.hparams.clone()
        self.leaves = leaves_of(self.hparams)
        for leaf in self.leaves:
            leaf.requires_grad_(True)
        self.schedule = None
        if method.endswith("schedule"):
            self.schedule = hyperopt.GeometricTolerance(
                30 * problem.rtol, problem.rtol, max(1, outer_steps // 2)
            )
        self.params, self.hvps, self.wall, self.total, self.cosines = (
            problem.params,
            0,
            0.0,
            0.0,
            [],
        )

    def step(self, step: int, check: bool) -> None:
        """Train the inner problem, one hypergradient (timed, counted), an Adam step."""
        problem, started = self.problem, time.perf_counter()
        hparams = self.hparams.detach()
        self.params = problem.train(self.params, hparams)
        adjoint = self.adjoint
        if self.schedule is not None:
            adjoint = adjoint.with_rtol(self.schedule(step + 1))
        synchronize()
        tick = time.perf_counter()
        grad, info = implicitfn.hypergradient(
            problem.inner, problem.outer, self.params, hparams, adjoint=adjoint
        )
        synchronize()
        self.wall += time.perf_counter() - tick
        self.hvps += int(info.num_steps)
        # Normalised gradient descent: the largest log-decay moves by outer_lr. Unlike Adam, whose
        # per-coordinate steps are about +-lr whatever a tiny component's size (so its sign,
        # i.e. rounding, decides), the step is continuous in the hypergradient: runs whose
        # hypergradients differ by the solve's error stay comparable.
        largest = max(float(g.abs().max()) for g in leaves_of(grad))
        with torch.no_grad():
            for leaf, g in zip(self.leaves, leaves_of(grad), strict=True):
                leaf -= problem.outer_lr / max(largest, 1e-30) * g
        synchronize()
        self.total += time.perf_counter() - started
        if check:  # not timed
            exact, _ = implicitfn.hypergradient(
                problem.inner, problem.outer, self.params, hparams, adjoint=self.reference
            )
            self.cosines.append(cosine(grad, exact))

    def row(self, outer_steps: int) -> dict:
        params = self.problem.train(self.params, self.hparams.detach())
        return {
            "problem": self.problem.name,
            "method": self.method,
            "outer_steps": outer_steps,
            "total_hvps": self.hvps,
            "wall_s": round(self.wall, 3),
            "total_s": round(self.total, 3),
            "final_val_loss": float(self.problem.outer(params, self.hparams.detach())),
            "min_cos": min(self.cosines),
            "preconditioner_builds": self.adjoint.preconditioner_builds,
            "hyperparameters": sum(t.numel() for t in self.leaves),
        }


def run(problem: Problem, methods: list[str], outer_steps: int, check_every: int, progress: bool):
    """The methods' runs in lockstep, one outer step each in a rotating order, so that load
    from other processes on a shared machine hits every method alike; returns their rows."""
    runs = [Run(problem, method, outer_steps) for method in methods]
    for step in tqdm(range(outer_steps), desc=problem.name, disable=not progress):
        check = step % check_every == 0 or step == outer_steps - 1
        shift = step % len(runs)
        for each in runs[shift:] + runs[:shift]:
            each.step(step, check)
    return [each.row(outer_steps) for each in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes, 3 outer steps (CI)")
    parser.add_argument("--problems", default="logreg,mlp,deconv")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--outer-steps", type=int, default=None, help="default 100; 3 --fast")
    parser.add_argument("--check-every", type=int, default=1, help="reference every k steps")
    parser.add_argument("--rtol", type=float, default=None, help="override every problem's rtol")
    parser.add_argument("--rank", type=int, default=None, help="override the Nystrom rank")
    parser.add_argument(
        "--spread",
        type=float,
        default=0.0,
        help="start from log-decays spread by this standard deviation (seeded), as after many "
        "hyper-steps (default 0: all equal)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the rows here")
    parser.add_argument("--plot", type=pathlib.Path, default=None, help="save a figure here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    check_device(parser, args.device)
    torch.set_num_threads(args.threads)
    outer_steps = args.outer_steps or (3 if args.fast else 100)
    builders = {
        "logreg": lambda: classifier_problem("logreg", None, args.fast, args.device),
        "mlp": lambda: classifier_problem("mlp", 128, args.fast, args.device),
        "deconv": lambda: deconvolution_problem(args.fast, args.device),
    }
    print(machine(args.threads))
    rows = []
    for name in args.problems.split(","):
        problem = builders[name]()
        if args.rtol is not None:
            problem.rtol = args.rtol
        if args.rank is not None:
            problem.rank = args.rank
        if args.spread:
            problem.hparams = spread_decays(problem.hparams, args.spread)
        methods = args.methods.split(",")
        rows += run(problem, methods, outer_steps, args.check_every, not args.no_progress)
        report(rows, name)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"rows saved to {args.json}")
    if args.plot:
        plot(rows, args.plot)
    failing = [r for r in rows if r["min_cos"] < 0.99 and not r["method"].endswith("schedule")]
    for row in failing:
        print(f"WARNING: {row['problem']} {row['method']}: min cosine {row['min_cos']:.4f} < 0.99")


def report(rows: list[dict], name: str) -> None:
    mine = [r for r in rows if r["problem"] == name]
    base = next((r for r in mine if r["method"] == "cg-zero"), mine[0])
    print(
        f"\n{name} ({mine[0]['hyperparameters']:,} hyperparameters, "
        f"{mine[0]['outer_steps']} outer steps)"
    )
    print(
        f"{'method':<22}{'HVPs':>9}{'fewer':>8}{'wall s':>9}{'faster':>8}"
        f"{'total s':>9}{'val loss':>11}{'vs zero':>9}{'min cos':>9}"
    )
    for r in mine:
        print(
            f"{r['method']:<22}{r['total_hvps']:>9}{base['total_hvps'] / r['total_hvps']:>7.2f}x"
            f"{r['wall_s']:>9.2f}{base['wall_s'] / r['wall_s']:>7.2f}x{r['total_s']:>9.1f}"
            f"{r['final_val_loss']:>11.5f}{r['final_val_loss'] / base['final_val_loss'] - 1:>+9.2%}"
            f"{r['min_cos']:>9.4f}"
        )


def plot(rows: list[dict], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    problems = list(dict.fromkeys(r["problem"] for r in rows))
    figure = Figure(figsize=(4 * len(problems), 3.4), layout="constrained")
    for axes, name in zip(
        figure.subplots(1, len(problems), squeeze=False)[0], problems, strict=True
    ):
        mine = [r for r in rows if r["problem"] == name]
        base = next((r for r in mine if r["method"] == "cg-zero"), mine[0])
        methods = [r["method"] for r in mine]
        axes.bar(methods, [base["total_hvps"] / r["total_hvps"] for r in mine], label="products")
        axes.plot(methods, [base["wall_s"] / r["wall_s"] for r in mine], "ko", label="wall time")
        axes.axhline(1.0, color="grey", lw=0.8)
        axes.set_title(f"{name} ({mine[0]['hyperparameters']:,} hyperparameters)")
        axes.set_ylabel("saving vs CG from zero (x)")
        for label in axes.get_xticklabels():  # long method names: slanted, anchored right
            label.set(rotation=35, horizontalalignment="right")
        axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"plot saved to {path}")


if __name__ == "__main__":
    main()
