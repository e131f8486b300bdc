"""Implicit MAML on scikit-learn's digits: many small bilevel problems at once under `vmap`.

Implicit MAML (Rajeswaran, Finn, Kakade & Levine, 2019) adapts a network to each few-shot task
by minimising the task's support loss plus a proximal term that keeps the adapted weights near
the meta-parameters,

    w*_i(theta, lam) = argmin_w  CE(w; support_i) + (lam / 2) ||w - theta||^2,

and meta-trains theta (and here also lam) on the query loss of the adapted weights. The
meta-gradient comes from the implicit function theorem, not from the adaptation steps: one
conjugate-gradient solve per task with the Gauss-Newton curvature plus lam * I.

The whole batch of tasks runs under one `torch.func.vmap`: the adaptation (a fixed number of
gradient steps), the optimality condition and the backward CG solve are all batched.

Tasks are N-way K-shot problems drawn from sklearn's 8x8 digits; the classes are split, so
meta-test tasks use digits never seen during meta-training (whose rotations are added as
extra meta-training classes). The script reports meta-test accuracy from the initial
meta-parameters, after meta-training, and for networks trained on each task from scratch,
shows a progress bar and saves a plot.

    python examples/imaml_digits.py            # full run, plot in outputs/imaml_digits.png
    python examples/imaml_digits.py --fast     # CI smoke run (< 30 s on 2 cores)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import support
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from tensordict import TensorDict
from torch.func import grad, vmap
from tqdm import tqdm

import implicitfn

TASK_DIMS = (None, 0, 0, 0, 0)  # meta-parameters shared by all tasks, task data batched
POSITIVE_INTS = (
    "ways",
    "shots",
    "queries",
    "channels",
    "meta_steps",
    "meta_batch",
    "inner_steps",
    "cg_steps",
    "scratch_steps",
    "eval_tasks",
    "eval_every",
    "threads",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--fast", action="store_true", help="small CI run (< 30 s on 2 cores)")
    add("--ways", type=int, default=4, help="N: classes per task")
    add("--shots", type=int, default=1, help="K: support examples per class")
    add("--queries", type=int, default=10, help="query examples per class")
    add("--train-classes", default="0-5", help="digits for meta-training, e.g. '0-5' or '0,2,4'")
    add("--test-classes", default="6-9", help="digits for meta-testing")
    add(
        "--no-rotations",
        action="store_true",
        help="do not add the rotated meta-training digits as extra classes",
    )
    add("--channels", type=int, default=8, help="filters of the 3x3 convolution")
    add("--meta-steps", type=int, default=300)
    add("--meta-batch", type=int, default=16, help="tasks per meta-gradient")
    add("--meta-lr", type=float, default=3e-3, help="Adam step for theta")
    add("--lam-lr", type=float, default=3e-2, help="Adam step for log lam")
    add("--lam", type=float, default=1.0, help="initial proximal strength")
    add("--fixed-lam", action="store_true", help="do not meta-learn lam")
    add("--inner-steps", type=int, default=40, help="accelerated gradient steps per adaptation")
    add("--cg-steps", type=int, default=40, help="most CG steps of the backward solve")
    add("--scratch-steps", type=int, default=200, help="gradient steps of the baseline")
    add("--scratch-decay", type=float, default=1e-3, help="weight decay of the baseline")
    add("--eval-tasks", type=int, default=300, help="meta-test tasks")
    add("--eval-every", type=int, default=25, help="meta-steps between meta-test evaluations")
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1, help="torch threads (tiny ops: one is fastest)")
    add("--plot", type=Path, default=Path("outputs") / "imaml_digits.png")
    add("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.fast:
        args.meta_steps, args.eval_tasks, args.eval_every = 30, 100, 30
        args.inner_steps, args.scratch_steps = 30, 100
    for name in POSITIVE_INTS:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if not (args.lam > 0 and args.meta_lr > 0 and args.lam_lr > 0 and args.scratch_decay >= 0):
        parser.error("--lam, --meta-lr and --lam-lr must be > 0, --scratch-decay >= 0")
    try:
        args.train_classes = parse_classes(args.train_classes)
        args.test_classes = parse_classes(args.test_classes)
    except ValueError as error:
        parser.error(str(error))
    if set(args.train_classes) & set(args.test_classes):
        parser.error("--train-classes and --test-classes must not overlap")
    return args


def parse_classes(spec: str) -> list[int]:
    """'0-5' -> [0, 1, 2, 3, 4, 5]; '1,3,7' -> [1, 3, 7]."""
    try:
        classes = []
        for part in spec.split(","):
            low, _, high = part.partition("-")
            classes.extend(range(int(low), int(high or low) + 1))
    except ValueError:
        classes = []
    if not classes or not all(0 <= c <= 9 for c in classes):
        raise ValueError(f"classes: expected digits 0-9 such as '0-5' or '1,3,7', got {spec!r}")
    return classes


# --------------------------------------------------------------------------------------------
# Few-shot tasks from the digits
# --------------------------------------------------------------------------------------------


def load_classes(digits, rotations):
    """The images of each digit, flattened, pixels in [0, 1]; one list entry per class.

    With `rotations`, each digit's 90-, 180- and 270-degree rotations are classes of their own
    (the usual way to get more classes out of Omniglot): six digits give 24 classes.
    """
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target)
    turns = range(4) if rotations else range(1)
    return [
        torch.rot90(images[labels == d], k, dims=(1, 2)).reshape(-1, 64)
        for d in digits
        for k in turns
    ]


class TaskSampler:
    """Draws batches of N-way K-shot tasks from a list of classes (one image tensor each).

    Each task picks `ways` classes in a random order (so a class gets a different label in
    different tasks), then `shots` support and `queries` query images per class, without
    overlap. A batch is four tensors with a leading task dimension, ready for `vmap`.
    """

    def __init__(self, by_class, ways, shots, queries, generator):
        if len(by_class) < ways:
            raise ValueError(f"{len(by_class)} classes cannot make {ways}-way tasks")
        smallest = min(len(x) for x in by_class)
        if shots + queries > smallest:
            raise ValueError(f"shots + queries = {shots + queries} > {smallest} images per class")
        self.by_class, self.gen = by_class, generator
        self.ways, self.shots, self.queries = ways, shots, queries

    def sample(self, num_tasks: int):
        support, query = [], []
        for _ in range(num_tasks):
            task_support, task_query = [], []
            for c in torch.randperm(len(self.by_class), generator=self.gen)[: self.ways].tolist():
                pool = self.by_class[c]
                picks = torch.randperm(len(pool), generator=self.gen)[: self.shots + self.queries]
                task_support.append(pool[picks[: self.shots]])
                task_query.append(pool[picks[self.shots :]])
            support.append(torch.cat(task_support))
            query.append(torch.cat(task_query))
        labels = torch.arange(self.ways)
        ys = labels.repeat_interleave(self.shots).expand(num_tasks, -1).contiguous()
        yq = labels.repeat_interleave(self.queries).expand(num_tasks, -1).contiguous()
        return torch.stack(support), ys, torch.stack(query), yq


def make_net(channels, ways):
    """A small CNN for 8x8 digits: 3x3 convolution, tanh, 2x2 average pooling, linear head."""
    return torch.nn.Sequential(
        torch.nn.Unflatten(-1, (1, 8, 8)),
        torch.nn.Conv2d(1, channels, 3),
        torch.nn.Tanh(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(-3),
        torch.nn.Linear(9 * channels, ways),
    )


# --------------------------------------------------------------------------------------------
# Solvers that run under vmap: a fixed number of steps, no branch on tensor values
# --------------------------------------------------------------------------------------------


def cross_entropy_loss(apply, penalty=None):
    """CE of the network on (x, y) [+ penalty], stated as a `CompositeLoss`.

    The split lets `GaussNewton` form J^T H_CE J (+ the penalty's Hessian), which is positive
    semidefinite for any network: with the proximal term it is positive definite and CG applies.
    """
    return implicitfn.CompositeLoss(
        predict=lambda w, h, x, y: apply(w, x),
        output_loss=lambda logits, h, x, y: F.cross_entropy(logits, y),
        penalty=penalty,
    )


def largest_curvature(loss, w, hparams, x, y, iterations=10):
    """Power iteration for the top eigenvalue of the Gauss-Newton matrix of `loss` at `w`."""
    operator = implicitfn.GaussNewton().linearize(loss, w, hparams, x, y)
    v = w.apply(torch.ones_like)
    for _ in range(iterations):
        u = operator.mv(v)
        v = u / implicitfn.tree_norm(u)
    return implicitfn.tree_vdot(v, operator.mv(v))


def accelerated_descent(loss, w, hparams, x, y, *, steps, lr, momentum):
    """`steps` of Nesterov-accelerated gradient descent on `loss(w, hparams, x, y)`."""
    step = grad(loss)
    previous = w
    for _ in range(steps):
        lookahead = implicitfn.tree_axpy(momentum, implicitfn.tree_axpy(-1.0, previous, w), w)
        previous, w = w, implicitfn.tree_axpy(-lr, step(lookahead, hparams, x, y), lookahead)
    return w


# --------------------------------------------------------------------------------------------
# The bilevel problem
# --------------------------------------------------------------------------------------------


class IMAML:
    """The inner problem, its solver with implicit derivatives, and the meta-loss."""

    def __init__(self, apply, inner_steps, cg_steps):
        self.apply, self.inner_steps = apply, inner_steps
        self.cg_infos: list[implicitfn.SolveInfo] = []
        self.support_loss = cross_entropy_loss(apply)
        self.inner_loss = cross_entropy_loss(apply, penalty=self.proximal)
        self.condition = implicitfn.stationarity(self.inner_loss)
        self.adapt = implicitfn.implicit_diff(
            self.condition,
            adjoint=implicitfn.ImplicitAdjoint(
                solver=implicitfn.CG(max_steps=cg_steps, rtol=1e-5),
                curvature=implicitfn.GaussNewton(),
                callback=self.cg_infos.append,
                inner_rtol=None,  # a fixed number of adaptation steps: approximate by design
            ),
        )(self.adaptation)

    @staticmethod
    def proximal(w, hparams, x, y):
        """(lam / 2) ||w - theta||^2 with lam = exp(log_lam)."""
        theta = hparams["theta"]
        squared = sum(((w[k] - theta[k]) ** 2).sum() for k in theta.keys(True, True))
        return 0.5 * hparams["log_lam"].exp() * squared

    def adaptation(self, w, hparams, x, y):
        """Accelerated gradient descent from theta for this task's support set.

        The step 1 / (L + lam) and momentum of a lam-strongly convex, (L + lam)-smooth problem,
        with L twice the top Gauss-Newton eigenvalue of the support loss at theta, estimated
        per task.
        """
        lam = hparams["log_lam"].exp()
        smooth = 2 * largest_curvature(self.support_loss, w, hparams, x, y) + lam
        root_kappa = torch.sqrt(smooth / lam)
        return accelerated_descent(
            self.inner_loss,
            w,
            hparams,
            x,
            y,
            steps=self.inner_steps,
            lr=1 / smooth,
            momentum=(root_kappa - 1) / (root_kappa + 1),
        )

    def task_loss(self, hparams, xs, ys, xq, yq):
        """Query loss of one task; aux: query accuracy and |grad| of the inner loss at w*."""
        adapted = self.adapt(hparams["theta"], hparams, xs, ys)
        logits = self.apply(adapted, xq)
        stationarity = implicitfn.tree_norm(self.condition.residual(adapted, hparams, xs, ys))
        accuracy = (logits.argmax(-1) == yq).float().mean()
        return F.cross_entropy(logits, yq), (accuracy, stationarity.detach())

    def meta_loss(self, hparams, tasks):
        """Mean query loss over a batch of tasks, all under one vmap.

        Returns `(loss, (mean accuracy, largest inner gradient norm))`.
        """
        losses, (accuracy, inner_grad) = vmap(self.task_loss, in_dims=TASK_DIMS)(hparams, *tasks)
        return losses.mean(), (accuracy.mean(), inner_grad.max())

    def meta_gradient(self, hparams, tasks):
        """`(meta-gradient, (accuracy, inner gradient norm))` for a batch of tasks."""
        return grad(self.meta_loss, has_aux=True)(hparams, tasks)

    @torch.no_grad()
    def accuracy(self, hparams, tasks, chunk=100):
        """Mean query accuracy of the adapted networks (tasks in vmapped chunks)."""
        count = tasks[0].shape[0]
        total = 0.0
        for start in range(0, count, chunk):
            part = tuple(t[start : start + chunk] for t in tasks)
            total += float(self.meta_loss(hparams, part)[1][0]) * part[0].shape[0]
        return total / count


def scratch_accuracy(apply, inits, tasks, *, weight_decay, steps):
    """Train a freshly initialised network on each task's support set, test on its queries.

    CE + (weight_decay / 2) ||w||^2 by accelerated gradient descent (momentum 0.9, step
    1 / (2 L) with L the top Gauss-Newton eigenvalue at the initialisation), all tasks in one
    vmap. `inits` holds one initialisation per task (a TensorDict with a task dimension).
    """
    loss = cross_entropy_loss(
        apply, lambda w, h, x, y: 0.5 * weight_decay * implicitfn.tree_vdot(w, w)
    )

    def train_and_test(w, xs, ys, xq, yq):
        lr = 1 / (2 * largest_curvature(loss, w, None, xs, ys) + weight_decay)
        w = accelerated_descent(loss, w, None, xs, ys, steps=steps, lr=lr, momentum=0.9)
        return (apply(w, xq).argmax(-1) == yq).float().mean()

    return float(vmap(train_and_test)(inits, *tasks).mean())


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.ways, args.shots, args.queries)
    train_pool = load_classes(args.train_classes, rotations=not args.no_rotations)
    meta_train = TaskSampler(train_pool, *shape, generator=gen)
    meta_test = TaskSampler(load_classes(args.test_classes, rotations=False), *shape, generator=gen)
    test_tasks = meta_test.sample(args.eval_tasks)

    apply, theta = implicitfn.functional_model(make_net(args.channels, args.ways))
    hparams = TensorDict({"theta": theta, "log_lam": torch.tensor(math.log(args.lam))})
    for leaf in hparams.values(True, True):
        leaf.requires_grad_()
    groups = [{"params": list(theta.values(True, True)), "lr": args.meta_lr}]
    if not args.fixed_lam:
        groups.append({"params": [hparams["log_lam"]], "lr": args.lam_lr})
    optimizer = torch.optim.Adam(groups)
    problem = IMAML(apply, args.inner_steps, args.cg_steps)

    print(
        f"implicit MAML on digits: {args.ways}-way {args.shots}-shot, meta-train digits "
        f"{args.train_classes} ({len(train_pool)} classes), meta-test digits "
        f"{args.test_classes}, {args.meta_batch} tasks per meta-step, "
        f"{torch.get_num_threads()} thread(s)"
    )
    inits = torch.stack(
        [
            implicitfn.functional_model(make_net(args.channels, args.ways))[1]
            for _ in range(args.eval_tasks)
        ]
    )
    scratch = scratch_accuracy(
        apply, inits, test_tasks, weight_decay=args.scratch_decay, steps=args.scratch_steps
    )
    before = problem.accuracy(hparams.detach(), test_tasks)
    history = {"step": [0], "test_acc": [before], "lam": [args.lam], "train_acc": []}

    bar = tqdm(
        range(1, args.meta_steps + 1),
        desc="meta-training",
        mininterval=1.0,
        disable=args.no_progress,
    )
    for step in bar:
        problem.cg_infos.clear()
        meta_grad, (train_acc, inner_grad) = problem.meta_gradient(
            hparams.detach(), meta_train.sample(args.meta_batch)
        )
        for leaf, g in zip(hparams.values(True, True), meta_grad.values(True, True), strict=True):
            leaf.grad = g
        optimizer.step()
        history["train_acc"].append(float(train_acc))
        if step % args.eval_every == 0 or step == args.meta_steps:
            history["step"].append(step)
            history["test_acc"].append(problem.accuracy(hparams.detach(), test_tasks))
            history["lam"].append(float(hparams["log_lam"].detach().exp()))
        cg = problem.cg_infos[-1]  # the batched SolveInfo: one entry per task
        bar.set_postfix(
            train_acc=f"{float(train_acc):.2f}",
            test_acc=f"{history['test_acc'][-1]:.3f}",
            lam=f"{history['lam'][-1]:.2f}",
            cg_steps=int(cg.num_steps.max()),
            inner_grad=f"{float(inner_grad):.0e}",
            refresh=False,
        )
    bar.close()
    after = history["test_acc"][-1]
    elapsed = time.perf_counter() - started

    print(
        f"meta-test accuracy, {args.eval_tasks} tasks of unseen digits {args.test_classes} "
        f"(chance {1 / args.ways:.2f}):"
    )
    rows = {
        f"trained from scratch ({args.scratch_steps} steps per task)": scratch,
        "implicit MAML, before meta-training": before,
        f"implicit MAML, after {args.meta_steps} meta-steps": after,
    }
    for label, value in rows.items():
        print(f"  {label:<44}{value:.3f}")
    print(
        "  meta-test accuracy during training: " + " ".join(f"{a:.3f}" for a in history["test_acc"])
    )
    print(f"  learned lam = {history['lam'][-1]:.3f}; total time {elapsed:.1f} s")
    plot(history, scratch, args)
    return {
        "scratch": scratch,
        "before": before,
        "after": after,
        "lam": history["lam"][-1],
        "seconds": elapsed,
    }


def plot(history, scratch, args) -> None:
    fig = Figure(figsize=(10, 3.8))
    ax_acc, ax_lam = fig.subplots(1, 2)
    train = torch.tensor(history["train_acc"])
    window = max(1, len(train) // 20)
    smooth = train.unfold(0, window, 1).mean(1)
    ax_acc.plot(
        range(window, window + len(smooth)),
        smooth,
        color="0.6",
        label=f"meta-train query (mean of {window})",
    )
    ax_acc.plot(history["step"], history["test_acc"], "o-", label="meta-test query, implicit MAML")
    ax_acc.axhline(scratch, color="C3", linestyle="--", label="meta-test, from scratch")
    ax_acc.axhline(1 / args.ways, color="k", linestyle=":", label="chance")
    ax_acc.set(
        xlabel="meta-step", ylabel="accuracy", title=f"{args.ways}-way {args.shots}-shot digits"
    )
    ax_acc.legend(fontsize=8)
    ax_lam.semilogy(history["step"], history["lam"], "o-")
    ax_lam.set(xlabel="meta-step", ylabel=r"$\lambda$", title="proximal strength (meta-learned)")
    fig.tight_layout()
    support.save_figure(fig, args.plot)


if __name__ == "__main__":
    main()
