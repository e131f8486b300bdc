"""Meta-gradient time of implicit MAML for a batch of tasks: vmap vs a Python loop vs torchopt.

Every method computes the same thing: for T few-shot tasks from sklearn's digits (4-way 1-shot,
10 queries per class), adapt the CNN of `examples/imaml_digits.py` (3x3 convolution with 8
filters, tanh, 2x2 average pooling, linear head; 372 weights) to each task by minimising
CE(support) + (lam/2)||w - theta||^2 with the same fixed number of accelerated gradient steps,
then differentiate the mean query loss with respect to (theta, log lam) by the implicit function
theorem with the exact Hessian and conjugate gradient (same step limit and tolerance):

- `implicitfn vmap`: one `torch.func.vmap` over the tasks; inner steps, optimality condition and
  the backward CG solve are batched (CG runs `--cg-steps` steps, freezing converged tasks).
- `implicitfn loop`: the same decorated solver called task by task (CG stops per task).
- `torchopt loop`: `torchopt.diff.implicit.custom_root` with `torchopt.linear_solve.solve_cg`,
  task by task. `torchopt vmap` is attempted too and reported when it fails.

The meta-gradients are checked against each other. Each method is warmed up once, then the
methods are timed in turn, `--repeats` rounds (so that load on a shared machine hits them alike);
the medians are reported with ratios relative to `implicitfn loop` in the same run.

    python benchmarks/imaml_vmap.py             # T = 1, 4, 16, 64
    python benchmarks/imaml_vmap.py --fast      # T = 4, 16, two repeats
    python benchmarks/imaml_vmap.py --device cuda   # on a GPU (tasks drawn on the CPU)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import grad, vmap  # noqa: E402
from tqdm import tqdm  # noqa: E402

import implicitfn  # noqa: E402

# The harness (a sibling when run as a script): the device check and the CUDA-aware timer sync.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import check_device, synchronize  # noqa: E402

# The task sampler and the adaptation loop are those of examples/imaml_digits.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from imaml_digits import TaskSampler, accelerated_descent, load_classes  # noqa: E402

KEYS = ("conv_w", "conv_b", "head_w", "head_b")
CHANNELS, WAYS, SHOTS, QUERIES = 8, 4, 1, 10
SMOOTHNESS = 4.0  # bound on the support loss's curvature at theta: adaptation step 1/(4 + lam)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="1,4,16,64", help="comma-separated batch sizes T")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner-steps", type=int, default=30)
    parser.add_argument("--cg-steps", type=int, default=30)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument("--fast", action="store_true", help="T = 4, 16 and two repeats")
    parser.add_argument("--plot", type=Path, default=Path("outputs") / "imaml_vmap.png")
    args = parser.parse_args(argv)
    if args.fast:
        args.tasks, args.repeats = "4,16", 2
    try:
        args.tasks = [int(t) for t in args.tasks.split(",")]
    except ValueError:
        parser.error(f"--tasks: expected comma-separated integers, got {args.tasks!r}")
    if not args.tasks or min(args.tasks) <= 0 or args.repeats <= 0 or args.threads <= 0:
        parser.error("--tasks, --repeats and --threads must be positive")
    check_device(parser, args.device)
    args.dtype = getattr(torch, args.dtype)
    return args


# --------------------------------------------------------------------------------------------
# The problem, shared by every method (params are dicts keyed by KEYS)
# --------------------------------------------------------------------------------------------


def sample_tasks(num_tasks, dtype, device, seed=0):
    """`num_tasks` 4-way 1-shot tasks on digits 0-5: (xs, ys, xq, yq), task dimension first.

    Drawn on the CPU (the same tasks on any device), returned on `device`."""
    by_class = load_classes(range(6), rotations=False)
    generator = torch.Generator().manual_seed(seed)
    xs, ys, xq, yq = TaskSampler(by_class, WAYS, SHOTS, QUERIES, generator).sample(num_tasks)
    return xs.to(device, dtype), ys.to(device), xq.to(device, dtype), yq.to(device)


def init_theta(dtype, device, seed=0):
    """PyTorch's default initialisation of the Conv2d and Linear layers (drawn on the CPU)."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, fan_in):
        return (2 * torch.rand(shape, generator=gen, dtype=dtype) - 1) / math.sqrt(fan_in)

    theta = {
        "conv_w": uniform((CHANNELS, 1, 3, 3), 9),
        "conv_b": uniform((CHANNELS,), 9),
        "head_w": uniform((WAYS, 9 * CHANNELS), 9 * CHANNELS),
        "head_b": uniform((WAYS,), 9 * CHANNELS),
    }
    return {k: v.to(device) for k, v in theta.items()}


def logits(w, x):
    """The CNN of the example, written with torch.nn.functional on a dict of weights."""
    features = torch.tanh(F.conv2d(x.reshape(-1, 1, 8, 8), w["conv_w"], w["conv_b"]))
    features = F.avg_pool2d(features, 2).flatten(1)
    return F.linear(features, w["head_w"], w["head_b"])


def inner_loss(w, hparams, x, y):
    theta = hparams["theta"]
    proximal = sum(((w[k] - theta[k]) ** 2).sum() for k in KEYS)
    return F.cross_entropy(logits(w, x), y) + 0.5 * hparams["log_lam"].exp() * proximal


def adaptation(w, hparams, x, y, steps):
    """Accelerated gradient descent, a fixed number of steps (vmappable)."""
    lam = hparams["log_lam"].exp()
    lr = 1.0 / (SMOOTHNESS + lam)
    root_kappa = torch.sqrt((SMOOTHNESS + lam) / lam)
    momentum = (root_kappa - 1) / (root_kappa + 1)
    return accelerated_descent(inner_loss, w, hparams, x, y, steps=steps, lr=lr, momentum=momentum)


# --------------------------------------------------------------------------------------------
# The methods: each returns the meta-gradient as a flat vector over (theta, log_lam)
# --------------------------------------------------------------------------------------------


def over_tasks(task_loss):
    """The mean of `task_loss(hparams, xs, ys, xq, yq)` over a batch of tasks, two ways.

    **Returns:** `(batched, looped)`, each a function of `(hparams, tasks)`: one `vmap` over the
    task dimension, or a Python loop over the tasks.
    """

    def batched(hparams, tasks):
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(hparams, *tasks).mean()

    def looped(hparams, tasks):
        count = tasks[0].shape[0]
        return sum(task_loss(hparams, *(t[i] for t in tasks)) for i in range(count)) / count

    return batched, looped


def make_implicitfn(args):
    adapt = implicitfn.implicit_diff(
        implicitfn.stationarity(inner_loss),
        adjoint=implicitfn.ImplicitAdjoint(
            solver=implicitfn.CG(max_steps=args.cg_steps, rtol=args.rtol),
            curvature=implicitfn.Hessian(),
            inner_rtol=None,  # a fixed number of adaptation steps: approximate by design
        ),
    )(lambda w, h, x, y: adaptation(w, h, x, y, args.inner_steps))

    def task_loss(hparams, xs, ys, xq, yq):
        return F.cross_entropy(logits(adapt(hparams["theta"], hparams, xs, ys), xq), yq)

    return over_tasks(task_loss)


def make_torchopt(args):
    import torchopt

    def as_dict(values):
        return dict(zip(KEYS, values, strict=True))

    def optimality(w, theta, log_lam, xs, ys):
        hparams = {"theta": as_dict(theta), "log_lam": log_lam}
        g = grad(inner_loss)(as_dict(w), hparams, xs, ys)
        return tuple(g[k] for k in KEYS)

    @torchopt.diff.implicit.custom_root(
        optimality,
        argnums=(1, 2),
        solve=torchopt.linear_solve.solve_cg(maxiter=args.cg_steps, rtol=args.rtol),
    )
    def adapt(w, theta, log_lam, xs, ys):
        hparams = {"theta": as_dict(theta), "log_lam": log_lam}
        adapted = adaptation(as_dict(w), hparams, xs, ys, args.inner_steps)
        return tuple(adapted[k] for k in KEYS)

    def task_loss(hparams, xs, ys, xq, yq):
        theta = tuple(hparams["theta"][k] for k in KEYS)
        adapted = adapt(theta, theta, hparams["log_lam"], xs, ys)
        return F.cross_entropy(logits(as_dict(adapted), xq), yq)

    return over_tasks(task_loss)


def meta_gradient(meta_loss, hparams, tasks):
    """Reverse-mode meta-gradient with ordinary autograd (the same path for every method)."""
    leaves = [hparams["theta"][k] for k in KEYS] + [hparams["log_lam"]]
    grads = torch.autograd.grad(meta_loss(hparams, tasks), leaves)
    return torch.cat([g.reshape(-1) for g in grads])


def timed(meta_loss, hparams, tasks):
    synchronize()
    start = time.perf_counter()
    value = meta_gradient(meta_loss, hparams, tasks)
    synchronize()
    return time.perf_counter() - start, value


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    theta = {k: v.requires_grad_() for k, v in init_theta(args.dtype, args.device).items()}
    log_lam = torch.tensor(0.0, dtype=args.dtype, device=args.device, requires_grad=True)
    hparams = {"theta": theta, "log_lam": log_lam}
    ours_vmap, ours_loop = make_implicitfn(args)
    methods = {"implicitfn vmap": ours_vmap, "implicitfn loop": ours_loop}
    try:
        torchopt_vmap, torchopt_loop = make_torchopt(args)
        methods |= {"torchopt loop": torchopt_loop, "torchopt vmap": torchopt_vmap}
    except ImportError as error:
        print(f"torchopt not available ({error}); skipping it")

    where = "" if args.device == "cpu" else f" on {args.device}"
    print(
        f"implicit MAML meta-gradient, {WAYS}-way {SHOTS}-shot digits, CNN with {CHANNELS} "
        f"filters, {args.inner_steps} inner steps, CG(max_steps={args.cg_steps}, "
        f"rtol={args.rtol}), {args.dtype}{where}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); median of {args.repeats}"
    )
    rows, failures = [], {}
    bar = tqdm(total=len(args.tasks) * len(methods) * (1 + args.repeats), desc="benchmark")
    for num_tasks in args.tasks:
        tasks = sample_tasks(num_tasks, args.dtype, args.device)
        values, times = {}, {}
        for name, meta_loss in methods.items():  # warm-up, and the value to compare
            bar.update(1 + args.repeats)
            if name in failures:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # torchopt: functorch.vjp
                    values[name] = timed(meta_loss, hparams, tasks)[1]
                times[name] = []
            except Exception as error:  # noqa: BLE001 - report why a method does not run
                first_line = str(error).strip().splitlines()[0]
                failures[name] = f"{type(error).__name__}: {first_line[:160]}"
        for _ in range(args.repeats):  # round-robin, so load on the machine hits all alike
            for name in times:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    times[name].append(timed(methods[name], hparams, tasks)[0])
        for name in times:
            seconds = statistics.median(times[name])
            rows.append(
                {"tasks": num_tasks, "method": name, "seconds": seconds, "grad": values[name]}
            )
    bar.close()

    report(rows, failures)
    plot(rows, args)
    return rows


def report(rows, failures) -> None:
    print(f"\n{'T':>4}  {'method':<16}{'time (ms)':>11}{'vs loop':>10}{'max rel. diff':>15}")
    for num_tasks in sorted({r["tasks"] for r in rows}):
        group = {r["method"]: r for r in rows if r["tasks"] == num_tasks}
        base = group.get("implicitfn loop")
        for name, row in group.items():
            ratio = f"{base['seconds'] / row['seconds']:.2f}x" if base else "-"
            diff = "-"
            if base:
                scale = base["grad"].abs().max()
                diff = f"{float((row['grad'] - base['grad']).abs().max() / scale):.1e}"
            print(f"{num_tasks:>4}  {name:<16}{1e3 * row['seconds']:>11.1f}{ratio:>10}{diff:>15}")
    print("(vs loop: implicitfn loop time / method time, > 1 is faster)")
    for name, why in failures.items():
        print(f"{name}: does not run: {why}")


def plot(rows, args) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        ax.loglog([r["tasks"] for r in mine], [r["seconds"] for r in mine], "o-", label=name)
    ax.set(
        xlabel="tasks per meta-gradient (T)",
        ylabel="seconds per meta-gradient",
        title=f"implicit MAML meta-gradient, {torch.get_num_threads()} thread(s)",
    )
    ax.legend()
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)
    print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
