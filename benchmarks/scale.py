"""Scale: a million hyperparameters, and one weight per training example, on a CPU.

1. A 64-H-10 tanh MLP on scikit-learn's digits (1,000 training / 797 validation images) with
   H = 13,334: 1,000,060 weights and one weight-decay hyperparameter per weight (log-penalties,
   exp(h) = 1e-2), float32. Inner training: L-BFGS from the network's initialisation.
2. Logistic regression on 100,000 synthetic examples (64 features, 10 classes, labels from a
   random linear teacher, 30% of them replaced by random labels) with one weight per training
   example, sigmoid(h_i) * loss_i; the outer loss is the cross-entropy on 10,000 clean
   validation examples. Inner training: L-BFGS to the optimum (the problem is convex).

For each problem, one hypergradient with CG, 10 steps, exact Hessian, by implicitfn
(`implicit_diff`, and with Gauss-Newton) and by torchopt (`custom_root` + `solve_cg`), all on
the same plain-tensor losses, and by unrolling 11 differentiable SGD steps. Reported: the time
in training-gradient evaluations (medians, one torch thread) and the peak memory increase.

How memory is measured: every method runs in a fresh Python process that loads the same
saved state (data, w*, hyperparameters) and runs the method once as a warm-up (lazy
initialisation is not the method's memory); then it collects garbage, returns freed heap pages
to the kernel (glibc `malloc_trim(0)`), resets the kernel's peak-RSS counter
(`/proc/self/clear_refs` <- 5; Linux >= 4.0), reads its resident set size, runs the method
again and reads the peak (`VmHWM` in `/proc/self/status`). The increase is the peak minus the
resident size before the call: every page the call touched (tensors, the autograd graph, the
allocator's slack), none of the setup. Then the method is timed in the same process.

With `--device cuda[:index]` the data, the inner training and every method run on the GPU (the
data are still drawn on the CPU, so the problems are the same), and the memory is the GPU's:
torch's peak allocated CUDA memory during the call (`torch.cuda.max_memory_allocated`, after
`reset_peak_memory_stats`) minus what was allocated before it; host memory is not counted.

Run:
    python benchmarks/scale.py          # both problems, about 5 minutes on one thread
    python benchmarks/scale.py --fast   # H = 1,334 (100k hyperparameters), 20k examples: CI
    python benchmarks/scale.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harness is a sibling
import _harness as H  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchopt\.")

METHODS = (
    "implicitfn CG",
    "implicitfn CG, Gauss-Newton",
    "implicitfn CG, forward-over-reverse",
    "torchopt CG",
    "unrolled SGD, 11 steps",
)
STEPS = 10


# ---------------------------------------------------------------------------------------------
# The two problems, as plain functions of tuples of tensors


def mlp_logits(params, x):
    w1, b1, w2, b2 = params
    return F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)


def decay_train_loss(params, hparams, x, y):
    penalty = sum((h.exp() * w * w).sum() for w, h in zip(params, hparams, strict=True))
    return F.cross_entropy(mlp_logits(params, x), y) + 0.5 * penalty


def decay_outer_loss(params, x, y):
    return F.cross_entropy(mlp_logits(params, x), y)


def weighted_train_loss(params, hparams, x, y):
    (weights,) = hparams
    w, b = params
    losses = F.cross_entropy(F.linear(x, w, b), y, reduction="none")
    return (torch.sigmoid(weights) * losses).mean() + 5e-4 * (w * w).sum()


def weighted_outer_loss(params, x, y):
    w, b = params
    return F.cross_entropy(F.linear(x, w, b), y)


PROBLEMS = {
    "decay": (decay_train_loss, decay_outer_loss),
    "weights": (weighted_train_loss, weighted_outer_loss),
}


def build(kind: str, size: int, device: str) -> dict:
    """Data, initial parameters and hyperparameters (seeded; drawn on the CPU), on `device`."""
    return {
        key: tuple(t.to(device) for t in value) if isinstance(value, tuple) else value.to(device)
        for key, value in _build(kind, size).items()
    }


def _build(kind: str, size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    if kind == "decay":
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        order = torch.randperm(len(labels), generator=generator)
        x = torch.as_tensor(images / 16.0, dtype=torch.float32)[order]
        y = torch.as_tensor(labels)[order]
        hidden = size
        params = (
            torch.randn(hidden, 64, generator=generator) / 8.0,
            torch.zeros(hidden),
            torch.randn(10, hidden, generator=generator) / math.sqrt(hidden),
            torch.zeros(10),
        )
        hparams = tuple(torch.full_like(p, math.log(1e-2)) for p in params)
        return dict(x=x[:1000], y=y[:1000], x_val=x[1000:], y_val=y[1000:], params=params,
                    hparams=hparams)  # fmt: skip
    examples = size
    teacher = torch.randn(10, 64, generator=generator)
    x = torch.randn(examples + 10_000, 64, generator=generator)
    y = (x @ teacher.T).argmax(1)
    noisy = torch.rand(examples, generator=generator) < 0.3
    y_train = torch.where(
        noisy, torch.randint(0, 10, (examples,), generator=generator), y[:examples]
    )
    return dict(
        x=x[:examples], y=y_train, x_val=x[examples:], y_val=y[examples:],
        params=(torch.zeros(10, 64), torch.zeros(10)), hparams=(torch.zeros(examples),),
    )  # fmt: skip


def train(state: dict, kind: str, iterations: int) -> dict:
    """Inner training with L-BFGS (full batch)."""
    train_loss, _ = PROBLEMS[kind]
    params = [p.clone().requires_grad_() for p in state["params"]]
    lbfgs = torch.optim.LBFGS(
        params, lr=1.0, max_iter=iterations, tolerance_grad=1e-9, tolerance_change=0.0,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        lbfgs.zero_grad()
        loss = train_loss(tuple(params), state["hparams"], state["x"], state["y"])
        loss.backward()
        return loss

    lbfgs.step(closure)
    state = dict(state, params=tuple(p.detach() for p in params))
    gradient = torch.autograd.grad(
        train_loss(
            tuple(p.requires_grad_() for p in params), state["hparams"], state["x"], state["y"]
        ),
        params,
    )
    state["gradient_norm"] = float(torch.sqrt(sum((g * g).sum() for g in gradient)))
    return state


# ---------------------------------------------------------------------------------------------
# One method in one process


def method(name: str, state: dict, kind: str):
    import torchopt

    import implicitfn

    train_loss, outer_loss = PROBLEMS[kind]
    x, y, x_val, y_val = state["x"], state["y"], state["x_val"], state["y_val"]
    solution, hparams = state["params"], state["hparams"]

    if name.startswith("implicitfn"):
        curvature = implicitfn.GaussNewton() if "Gauss" in name else implicitfn.Hessian()
        if "forward-over-reverse" in name:  # no stored linearisation: less memory, more time
            curvature = implicitfn.Hessian("forward-over-reverse")
        keys = [str(i) for i in range(len(solution))]
        if "Gauss" in name:
            if kind == "decay":
                loss = implicitfn.CompositeLoss(
                    predict=lambda p, h, x, y: mlp_logits(tuple(p.values()), x),
                    output_loss=lambda out, h, x, y: F.cross_entropy(out, y),
                    penalty=lambda p, h, x, y: 0.5 * sum(
                        (h[k].exp() * p[k] * p[k]).sum() for k in p),
                )  # fmt: skip
            else:
                loss = implicitfn.CompositeLoss(
                    predict=lambda p, h, x, y: F.linear(x, p["0"], p["1"]),
                    output_loss=lambda out, h, x, y: (
                        torch.sigmoid(h["0"]) * F.cross_entropy(out, y, reduction="none")
                    ).mean(),
                    penalty=lambda p, h, x, y: 5e-4 * (p["0"] * p["0"]).sum(),
                )
        else:

            def loss(p, h, x, y):
                return train_loss(tuple(p.values()), tuple(h.values()), x, y)

        solver = implicitfn.CG(max_steps=STEPS, rtol=0)
        infos = []

        @implicitfn.implicit_diff(
            implicitfn.stationarity(loss), adjoint=implicitfn.ImplicitAdjoint(solver=solver, curvature=curvature, on_failure="warn", callback=infos.append),
        )  # fmt: skip
        def inner(params, hparams, x, y):
            return params

        start = dict(zip(keys, solution, strict=True))

        def run():
            meta = [h.detach().requires_grad_() for h in hparams]
            h = dict(zip([str(i) for i in range(len(meta))], meta, strict=True))
            w = inner(start, h, x, y)
            return torch.autograd.grad(outer_loss(tuple(w.values()), x_val, y_val), meta), infos

        return run

    if name == "torchopt CG":

        def optimality(params, meta, x, y):
            return torch.func.grad(train_loss)(params, meta, x, y)

        @torchopt.diff.implicit.custom_root(
            optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=STEPS, rtol=0.0)
        )
        def inner(params, meta, x, y):
            return solution

        def run():
            meta = tuple(h.detach().requires_grad_() for h in hparams)
            w = inner(solution, meta, x, y)
            return torch.autograd.grad(outer_loss(w, x_val, y_val), meta), None

        return run

    learning_rate = state["learning_rate"]

    def run():  # unrolled
        meta = tuple(h.detach().requires_grad_() for h in hparams)
        w = tuple(p.detach().requires_grad_() for p in solution)
        for _ in range(STEPS + 1):
            grads = torch.autograd.grad(train_loss(w, meta, x, y), w, create_graph=True)
            w = tuple(p - learning_rate * g for p, g in zip(w, grads, strict=True))
        return torch.autograd.grad(outer_loss(w, x_val, y_val), meta), None

    return run


def _save(tensor: torch.Tensor, path: str, name: str) -> str:
    target = f"{path}.{''.join(c if c.isalnum() else '_' for c in name)}.result"
    torch.save(tensor, target)
    return target


def proc_status(field: str) -> int:
    """A `kB` field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(name: str, path: str, kind: str, repeats: int, threads: int, device: str) -> None:
    torch.set_num_threads(threads)
    state = torch.load(path, weights_only=False, map_location=device)
    run = method(name, state, kind)
    train_loss = PROBLEMS[kind][0]
    run()  # warm-up: lazy initialisation is not the method's memory
    gc.collect()
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:  # the GPU's memory: what torch allocates there during the call
        H.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before, reset = torch.cuda.memory_allocated(device), True
    else:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
        if trim is not None:
            trim(0)  # give freed heap pages back, so that the resident size is what is alive
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset the peak RSS to the current RSS
            reset = True
        except OSError:
            reset = False
        before = proc_status("VmRSS")
    H.synchronize()
    start = time.perf_counter()
    result, infos = run()
    H.synchronize()
    first = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if on_gpu else proc_status("VmHWM")
    params = [p.detach().requires_grad_() for p in state["params"]]

    def gradient():
        return torch.autograd.grad(train_loss(tuple(params), state["hparams"], state["x"],
                                              state["y"]), params)  # fmt: skip

    gradient()
    grad_times, times = [], []
    for _ in range(repeats):  # interleaved with the gradient that is the unit
        H.synchronize()
        t = time.perf_counter()
        gradient()
        H.synchronize()
        grad_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        run()
        H.synchronize()
        times.append(time.perf_counter() - t)
    flat = torch.cat([g.reshape(-1) for g in result])
    info = infos[-1] if infos else None
    print(json.dumps(dict(
        method=name, increase=peak - before, reset=reset, first_s=first,
        time_s=statistics.median(times), gradient_s=statistics.median(grad_times),
        result=_save(flat.cpu(), path, name),
        steps=None if info is None else int(info.num_steps),
        outcome=None if info is None else info.outcome_names()[0],
    )))  # fmt: skip


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="smaller sizes, one repeat (CI)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=13_334)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--problems", nargs="+", default=["decay", "weights"])
    parser.add_argument("--train-steps", type=int, default=150, help="L-BFGS iterations (MLP)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    H.check_device(parser, args.device)
    if args.child:
        child(args.child, args.state, args.kind, args.repeats, args.threads, args.device)
        return
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    if args.fast:  # each method is a fresh process (~3 s to import torch): two of them
        args.hidden, args.examples, args.repeats, args.train_steps = 1_334, 20_000, 1, 40
        args.methods = ["implicitfn CG", "torchopt CG"]
    sizes = {"decay": args.hidden, "weights": args.examples}
    sizes = {kind: sizes[kind] for kind in args.problems}
    where = "" if args.device == "cpu" else f"; device {args.device}"
    print(f"# Scale\n\nMachine: {H.machine(args.threads)}{where}\n")
    with (
        tempfile.TemporaryDirectory() as folder,
        tqdm(
            total=len(sizes) * (1 + len(args.methods)),
            desc="scale",
            file=sys.stderr,
            mininterval=1.0,
        ) as bar,
    ):
        for kind, size in sizes.items():
            state = build(kind, size, args.device)
            bar.set_postfix_str(f"{kind}: inner training")
            state = train(state, kind, iterations=args.train_steps if kind == "decay" else 200)
            num_params = sum(p.numel() for p in state["params"])
            num_hparams = sum(h.numel() for h in state["hparams"])
            # The unrolled step: 1 / (largest Hessian eigenvalue), by 20 power iterations.
            state["learning_rate"] = 1.0 / top_eigenvalue(state, kind)
            path = os.path.join(folder, f"{kind}.pt")
            torch.save(state, path)
            bar.update()
            rows = {}
            for name in args.methods:
                bar.set_postfix_str(f"{kind}: {name}")
                command = [sys.executable, os.path.abspath(__file__), "--child", name, "--state",
                           path, "--kind", kind, "--repeats", str(args.repeats), "--threads",
                           str(args.threads), "--device", args.device]  # fmt: skip
                output = subprocess.run(command, capture_output=True, text=True, check=True)
                rows[name] = json.loads(output.stdout.strip().splitlines()[-1])
                bar.update()
            report(kind, num_params, num_hparams, state, rows, args.device)


def top_eigenvalue(state: dict, kind: str) -> float:
    train_loss = PROBLEMS[kind][0]
    params = [p.detach().requires_grad_() for p in state["params"]]
    gradient = torch.autograd.grad(
        train_loss(tuple(params), state["hparams"], state["x"], state["y"]), params,
        create_graph=True,
    )  # fmt: skip
    vector = [torch.randn_like(p) for p in params]
    estimate = 1.0
    for _ in range(20):
        norm = math.sqrt(sum(float((v * v).sum()) for v in vector))
        vector = [v / norm for v in vector]
        vector = list(torch.autograd.grad(gradient, params, vector, retain_graph=True))
        estimate = math.sqrt(sum(float((v * v).sum()) for v in vector))
    return estimate


def report(
    kind: str, num_params: int, num_hparams: int, state: dict, rows: dict, device: str
) -> None:
    param_bytes = 4 * num_params
    if kind == "decay":
        title = (f"MLP 64-{state['params'][0].shape[0]}-10 on digits: {num_params:,} weights, "
                 f"{num_hparams:,} weight-decay hyperparameters")  # fmt: skip
    else:
        title = (f"logistic regression, {state['x'].shape[0]:,} synthetic examples: "
                 f"{num_hparams:,} example weights")  # fmt: skip
    print(f"## {title}\n")
    print(f"Inner training: |grad L_T(w*)| = {state['gradient_norm']:.1e}. Parameters: "
          f"{param_bytes / 2**20:.1f} MiB (float32); training data "
          f"{state['x'].numel() * 4 / 2**20:.1f} MiB.\n")  # fmt: skip
    reference = rows["torchopt CG"]["result"]
    memory = "peak memory increase" if device == "cpu" else f"peak {device} memory increase"
    print(f"| method | time (s) | time in gradients | {memory} (MiB) | "
          "x parameter size | vs torchopt | CG steps | cosine to torchopt's |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    torchopt = rows["torchopt CG"]
    for name, row in rows.items():
        cosine = "–"
        if reference is not None and row["result"] is not None:
            a, b = torch.load(row["result"]), torch.load(reference)
            cosine = f"{float(F.cosine_similarity(a, b, dim=0)):.4f}"
        steps = "–" if row["steps"] is None else f"{row['steps']}"
        memory = row["increase"] / torchopt["increase"]
        print(
            f"| {name} | {row['time_s']:.2f} | {row['time_s'] / row['gradient_s']:.1f} | "
            f"{row['increase'] / 2**20:.0f} | {row['increase'] / param_bytes:.1f} | "
            f"memory {memory:.2f}x, time {row['time_s'] / torchopt['time_s']:.2f}x | {steps} | "
            f"{cosine} |"
        )
    if not all(row["reset"] for row in rows.values()):
        print("\n(peak-RSS reset unavailable: increases are measured from the process start)")
    print(flush=True)


if __name__ == "__main__":
    main()
