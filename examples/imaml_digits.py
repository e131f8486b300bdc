"""Implicit MAML on scikit-learn's digits: many small bilevel problems at once under `vmap`.

Implicit MAML (Rajeswaran, Finn, Kakade & Levine, 2019) adapts a network to each few-shot task
by minimising the task's support loss plus a proximal term that keeps the adapted weights near
the meta-parameters,

    w*_i(theta, lam) = argmin_w  CE(w; support_i) + (lam / 2) ||w - theta||^2,

and meta-trains theta (and here also lam) on the query loss of the adapted weights. The
meta-gradient comes from the implicit function theorem, never from the adaptation steps:
one conjugate-gradient solve per task with the (Gauss-Newton) curvature plus lam * I.

The whole batch of tasks runs under one `torch.func.vmap`: the adaptation (a fixed number of
gradient steps), the optimality condition and the backward CG solve are all batched.

Tasks are N-way K-shot problems drawn from sklearn's 8x8 digits; the classes are split, so
meta-test tasks use digits never seen during meta-training. The script reports meta-test
accuracy from the initial meta-parameters, after meta-training, and for networks trained on
each task from scratch, shows a progress bar and saves a plot.

    python examples/imaml_digits.py            # full run
    python examples/imaml_digits.py --fast     # CI smoke run (< 30 s on 2 cores)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from torch.func import grad, vmap  # noqa: E402
from tqdm import tqdm  # noqa: E402

import implicitfn  # noqa: E402

TASK_DIMS = (None, 0, 0, 0, 0)  # meta-parameters shared by all tasks, task data batched


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="small CI run (< 30 s)")
    parser.add_argument("--ways", type=int, default=4, help="N: classes per task")
    parser.add_argument("--shots", type=int, default=1, help="K: support examples per class")
    parser.add_argument("--queries", type=int, default=10, help="query examples per class")
    parser.add_argument(
        "--train-classes", default="0-5", help="digits for meta-training, e.g. '0-5' or '0,2,4'"
    )
    parser.add_argument("--test-classes", default="6-9", help="digits for meta-testing")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units of the MLP")
    parser.add_argument("--meta-steps", type=int, default=400)
    parser.add_argument("--meta-batch", type=int, default=16, help="tasks per meta-gradient")
    parser.add_argument("--meta-lr", type=float, default=3e-3)
    parser.add_argument("--lam", type=float, default=1.0, help="initial proximal strength")
    parser.add_argument("--fixed-lam", action="store_true", help="do not meta-learn lam")
    parser.add_argument("--inner-steps", type=int, default=50, help="adaptation gradient steps")
    parser.add_argument(
        "--smoothness", type=float, default=4.0,
        help="curvature bound L of the support loss: adaptation steps are 1 / (L + lam)",
    )
    parser.add_argument("--scratch-steps", type=int, default=200, help="steps of the baseline")
    parser.add_argument("--scratch-decay", type=float, default=1e-2, help="its weight decay")
    parser.add_argument("--cg-steps", type=int, default=30, help="CG steps of the backward solve")
    parser.add_argument("--eval-tasks", type=int, default=200, help="meta-test tasks")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--plot", type=Path, default=Path("imaml_digits.png"))
    args = parser.parse_args(argv)
    if args.fast:
        args.meta_steps, args.eval_tasks, args.eval_every = 60, 100, 20
    for name in ("ways", "shots", "queries", "hidden", "meta_steps", "meta_batch", "inner_steps",
                 "cg_steps", "eval_tasks", "eval_every"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if not args.lam > 0:
        parser.error("--lam must be > 0")
    return args


def parse_classes(spec: str) -> list[int]:
    """'0-5' -> [0, 1, 2, 3, 4, 5]; '1,3,7' -> [1, 3, 7]."""
    classes: list[int] = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        classes.extend(range(int(low), int(high or low) + 1))
    if not classes or not all(0 <= c <= 9 for c in classes):
        raise ValueError(f"classes: expected digits 0-9 such as '0-5' or '1,3,7', got {spec!r}")
    return classes


# --------------------------------------------------------------------------------------------
# Few-shot tasks from the digits
# --------------------------------------------------------------------------------------------


class TaskSampler:
    """Draws batches of N-way K-shot tasks from a fixed set of digit classes.

    Each task picks `ways` of the classes in a random order (so a class gets a different label
    in different tasks), then `shots` support and `queries` query images per class, without
    overlap. A batch is four tensors with a leading task dimension, ready for `vmap`.
    """

    def __init__(self, images, labels, classes, ways, shots, queries, generator):
        if len(classes) < ways:
            raise ValueError(f"{len(classes)} classes cannot make {ways}-way tasks")
        self.by_class = [images[labels == c] for c in classes]
        smallest = min(len(x) for x in self.by_class)
        if shots + queries > smallest:
            raise ValueError(f"shots + queries = {shots + queries} > {smallest} images per class")
        self.ways, self.shots, self.queries, self.gen = ways, shots, queries, generator

    def sample(self, num_tasks: int):
        support, query = [], []
        for _ in range(num_tasks):
            chosen = torch.randperm(len(self.by_class), generator=self.gen)[: self.ways]
            task_support, task_query = [], []
            for c in chosen.tolist():
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


# --------------------------------------------------------------------------------------------
# The bilevel problem
# --------------------------------------------------------------------------------------------


def cross_entropy_loss(apply, penalty):
    """CE of the network's logits on (x, y) + penalty, stated as a CompositeLoss.

    The split into predict / output loss / penalty lets `GaussNewton` form
    $J^T H_{CE} J + \\nabla^2 \\mathrm{penalty}$, positive definite for any network once the
    penalty is strongly convex: CG always applies.
    """
    return implicitfn.CompositeLoss(
        predict=lambda w, h, x, y: apply(w, x),
        output_loss=lambda logits, h, x, y: F.cross_entropy(logits, y),
        penalty=penalty,
    )


def accelerated_descent(loss, w, hparams, x, y, *, steps, lr, momentum):
    """`steps` of Nesterov-accelerated gradient descent on `loss(w, hparams, x, y)`.

    A fixed step count and no branch on tensor values: it runs under `vmap` as it is.
    """
    step = grad(loss)
    previous = w
    for _ in range(steps):
        lookahead = implicitfn.tree_axpy(momentum, implicitfn.tree_axpy(-1.0, previous, w), w)
        previous, w = w, implicitfn.tree_axpy(-lr, step(lookahead, hparams, x, y), lookahead)
    return w


class IMAML:
    """The inner problem, the adaptation solver and the meta-loss of implicit MAML.

    Adaptation minimises CE(w; support) + (lam / 2) ||w - theta||^2 by accelerated gradient
    descent from theta, with step 1 / (smoothness + lam) and the momentum of a
    lam-strongly-convex problem, where `smoothness` bounds the curvature of the CE term.
    """

    def __init__(self, apply, inner_steps, smoothness, cg_steps):
        self.apply = apply
        self.inner_steps, self.smoothness = inner_steps, smoothness
        self.cg_infos: list[implicitfn.SolveInfo] = []
        self.inner_loss = cross_entropy_loss(apply, self.proximal)
        self.condition = implicitfn.stationarity(self.inner_loss)
        self.adapt = implicitfn.implicit_diff(
            self.condition,
            solver=implicitfn.CG(max_steps=cg_steps, rtol=1e-5),
            curvature=implicitfn.GaussNewton(),
            callback=self.cg_infos.append,
        )(self.adaptation)

    @staticmethod
    def proximal(w, hparams, x, y):
        """(lam / 2) ||w - theta||^2 with lam = exp(log_lam)."""
        theta = hparams["theta"]
        squared = sum(((w[k] - theta[k]) ** 2).sum() for k in theta.keys(True, True))
        return 0.5 * hparams["log_lam"].exp() * squared

    def adaptation(self, w, hparams, x, y):
        lam = hparams["log_lam"].exp()
        root_kappa = torch.sqrt((self.smoothness + lam) / lam)
        return accelerated_descent(
            self.inner_loss, w, hparams, x, y, steps=self.inner_steps,
            lr=1.0 / (self.smoothness + lam), momentum=(root_kappa - 1) / (root_kappa + 1),
        )

    def task_loss(self, hparams, xs, ys, xq, yq):
        adapted = self.adapt(hparams["theta"], hparams, xs, ys)
        logits = self.apply(adapted, xq)
        # how far the adaptation is from stationarity, relative to the gradient at theta
        stationarity = implicitfn.tree_norm(self.condition.residual(adapted, hparams, xs, ys))
        metrics = ((logits.argmax(-1) == yq).float().mean(), stationarity.detach())
        return F.cross_entropy(logits, yq), metrics

    def meta_loss(self, hparams, tasks):
        """Mean query loss over a batch of tasks, all under one vmap.

        Returns `(loss, (accuracy, largest inner gradient norm))`.
        """
        losses, (accuracy, inner_grad) = vmap(self.task_loss, in_dims=TASK_DIMS)(hparams, *tasks)
        return losses.mean(), (accuracy.mean(), inner_grad.max())

    def meta_gradient(self, hparams, tasks):
        """`(meta-gradient, (accuracy, inner gradient norm))` for a batch of tasks."""
        return grad(self.meta_loss, has_aux=True)(hparams, tasks)

    @torch.no_grad()
    def accuracy(self, hparams, tasks, chunk=50):
        """Mean query accuracy of the adapted networks (tasks in vmapped chunks)."""
        total = 0.0
        count = tasks[0].shape[0]
        for start in range(0, count, chunk):
            part = tuple(t[start : start + chunk] for t in tasks)
            total += float(self.meta_loss(hparams, part)[1][0]) * part[0].shape[0]
        return total / count


def scratch_accuracy(apply, make_net, tasks, *, weight_decay, steps, lr, chunk=50):
    """Train a freshly initialised network on each task's support set, test on its queries.

    CE + (weight_decay / 2) ||w||^2, accelerated gradient descent (momentum 0.9), vmapped.
    """
    loss = cross_entropy_loss(apply, lambda w, h, x, y: 0.5 * weight_decay * implicitfn.tree_vdot(w, w))

    def train_and_test(w, xs, ys, xq, yq):
        w = accelerated_descent(loss, w, None, xs, ys, steps=steps, lr=lr, momentum=0.9)
        return (apply(w, xq).argmax(-1) == yq).float().mean()

    count = tasks[0].shape[0]
    accuracies = []
    for start in range(0, count, chunk):
        part = tuple(t[start : start + chunk] for t in tasks)
        inits = [implicitfn.functional_model(make_net())[1] for _ in range(part[0].shape[0])]
        accuracies.append(vmap(train_and_test)(torch.stack(inits), *part))
    return float(torch.cat(accuracies).mean())


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def load_data():
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixels in [0, 1]
    return images, torch.tensor(digits.target)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    train_classes, test_classes = parse_classes(args.train_classes), parse_classes(args.test_classes)
    if set(train_classes) & set(test_classes):
        raise SystemExit("--train-classes and --test-classes must not overlap")

    images, labels = load_data()
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.ways, args.shots, args.queries)
    meta_train = TaskSampler(images, labels, train_classes, *shape, generator=gen)
    meta_test = TaskSampler(images, labels, test_classes, *shape, generator=gen)
    test_tasks = meta_test.sample(args.eval_tasks)

    def make_net():
        return torch.nn.Sequential(
            torch.nn.Linear(64, args.hidden), torch.nn.Tanh(), torch.nn.Linear(args.hidden, args.ways)
        )

    apply, theta = implicitfn.functional_model(make_net())
    hparams = TensorDict({"theta": theta, "log_lam": torch.tensor(math.log(args.lam))})
    learned = [leaf.requires_grad_() for leaf in hparams.values(True, True)]
    if args.fixed_lam:
        learned = learned[:-1]
    optimizer = torch.optim.Adam(learned, lr=args.meta_lr)
    problem = IMAML(apply, args.inner_steps, args.smoothness, args.cg_steps)

    print(
        f"implicit MAML on digits: {args.ways}-way {args.shots}-shot, meta-train digits "
        f"{train_classes}, meta-test digits {test_classes}, {args.meta_batch} tasks per "
        f"meta-step, {torch.get_num_threads()} thread(s)"
    )
    scratch = scratch_accuracy(
        apply, make_net, test_tasks, weight_decay=args.scratch_decay, steps=args.scratch_steps,
        lr=1.0 / args.smoothness,
    )
    before = problem.accuracy(hparams.detach(), test_tasks)
    history = {"step": [0], "test_acc": [before], "lam": [args.lam], "train_acc": []}

    bar = tqdm(range(1, args.meta_steps + 1), desc="meta-training", mininterval=1.0)
    for step in bar:
        tasks = meta_train.sample(args.meta_batch)
        problem.cg_infos.clear()
        meta_grad, (train_acc, inner_grad) = problem.meta_gradient(hparams.detach(), tasks)
        for leaf, g in zip(hparams.values(True, True), meta_grad.values(True, True), strict=True):
            leaf.grad = g
        optimizer.step()
        history["train_acc"].append(float(train_acc))
        if step % args.eval_every == 0 or step == args.meta_steps:
            history["step"].append(step)
            history["test_acc"].append(problem.accuracy(hparams.detach(), test_tasks))
            history["lam"].append(float(hparams["log_lam"].detach().exp()))
        cg = problem.cg_infos[-1]  # batched SolveInfo: one entry per task
        bar.set_postfix(
            train_acc=f"{float(train_acc):.2f}",
            test_acc=f"{history['test_acc'][-1]:.3f}",
            lam=f"{history['lam'][-1]:.2f}",
            cg_steps=int(cg.num_steps.max()),
            inner_grad=f"{float(inner_grad):.0e}",
            refresh=False,
        )
    after = history["test_acc"][-1]
    elapsed = time.perf_counter() - started

    print(f"meta-test accuracy over {args.eval_tasks} tasks of digits {test_classes} "
          f"(chance {1 / args.ways:.2f}):")
    print(f"  from scratch ({args.scratch_steps} steps, fresh init)          {scratch:.3f}")
    print(f"  implicit MAML before meta-training             {before:.3f}")
    print(f"  implicit MAML after {args.meta_steps} meta-steps{'':<{19 - len(str(args.meta_steps))}}"
          f"{after:.3f}")
    print(f"  learned lam = {history['lam'][-1]:.3f}; total time {elapsed:.1f} s")
    plot(history, scratch, args)
    return {"scratch": scratch, "before": before, "after": after, "lam": history["lam"][-1],
            "seconds": elapsed}


def plot(history, scratch, args) -> None:
    fig, (ax_acc, ax_lam) = plt.subplots(1, 2, figsize=(10, 3.8))
    train = torch.tensor(history["train_acc"])
    window = max(1, len(train) // 20)
    smooth = train.unfold(0, window, 1).mean(1) if len(train) >= window else train
    ax_acc.plot(range(window, window + len(smooth)), smooth, color="0.6",
                label=f"meta-train query (mean of {window})")
    ax_acc.plot(history["step"], history["test_acc"], "o-", label="meta-test query, implicit MAML")
    ax_acc.axhline(scratch, color="C3", linestyle="--", label="meta-test, from scratch")
    ax_acc.axhline(1 / args.ways, color="k", linestyle=":", label="chance")
    ax_acc.set(xlabel="meta-step", ylabel="accuracy",
               title=f"{args.ways}-way {args.shots}-shot digits")
    ax_acc.legend(fontsize=8)
    ax_lam.plot(history["step"], history["lam"], "o-")
    ax_lam.set(xlabel="meta-step", ylabel=r"$\lambda$", title="proximal strength")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)
    print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
