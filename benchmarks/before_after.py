"""The core at an earlier commit against the working tree, in one process, interleaved.

`git archive` extracts `implicitfn/` at `--commit` into a temporary folder as the package
`implicitfn_base` (every `implicitfn` name in it renamed), so both versions are imported side by
side and timed in the same rounds on the problems of `peers.py`, with `hypergradient(...)` and
k = 10 steps. Needs the repository's history (not a shallow clone).

Run:
    python benchmarks/before_after.py                   # 379324a: before the issue-6 optimisations
    python benchmarks/before_after.py --fast            # logistic regression, 3 rounds
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings

import _harness as H
import torch
from tqdm import tqdm

import implicitfn


def extract(commit: str, folder: str) -> None:
    root = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", root, "archive", commit, "implicitfn"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    os.rename(os.path.join(folder, "implicitfn"), os.path.join(folder, "implicitfn_base"))
    for directory, _, files in os.walk(os.path.join(folder, "implicitfn_base")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path) as source:
                    text = re.sub(r"\bimplicitfn\b", "implicitfn_base", source.read())
                with open(path, "w") as target:
                    target.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="379324a")
    parser.add_argument("--fast", action="store_true", help="logreg, 3 rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--problems", nargs="+", default=["logreg", "mlp"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    folder = tempfile.mkdtemp()
    extract(args.commit, folder)
    sys.path.insert(0, folder)
    import implicitfn_base as base

    problems = ["logreg"] if args.fast else args.problems
    rounds = 3 if args.fast else args.rounds
    print(
        f"# Core at {args.commit} against the working tree\n\nMachine: {H.machine(args.threads)}\n"
    )
    print("| problem | solver | before (ms) | after (ms) | speed-up | cosine before | after |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in problems:
        setup = H.load(name, progress=H.stderr_progress)
        problem, k = setup.problem, 10
        alpha = 1.0 / setup.eigenvalue_max
        loss = problem.train_loss
        base_loss = base.CompositeLoss(loss.predict, loss.output_loss, loss.penalty)

        def make(lib, solver, curvature, train=loss, setup=setup, problem=problem):
            if hasattr(lib, "ImplicitAdjoint"):  # 0.2: the options live in one adjoint object
                options = dict(adjoint=lib.ImplicitAdjoint(solver, curvature, on_failure="warn"))
            else:
                options = dict(solver=solver, curvature=curvature, on_failure="warn")
            return lambda: lib.hypergradient(
                train, problem.outer_loss, setup.params, setup.hparams,
                inner_args=setup.inner_args, outer_args=setup.outer_args, **options,
            )[0]  # fmt: skip

        def fixed_cg(lib, k=k):  # exactly k steps: rtol=None before 0.2, rtol=0 since
            return lib.CG(max_steps=k, rtol=0 if hasattr(lib, "Outcome") else None)

        def neumann(lib, k=k, alpha=alpha):  # the budget was `steps` before 0.2, `max_steps` since
            budget = "max_steps" if hasattr(lib, "Outcome") else "steps"
            return lib.Neumann(alpha=alpha, **{budget: k})

        pairs = {
            "CG, Hessian": (
                make(base, fixed_cg(base), base.Hessian()),
                make(implicitfn, fixed_cg(implicitfn), implicitfn.Hessian()),
            ),
            "Neumann, Hessian": (
                make(base, neumann(base), base.Hessian()),
                make(implicitfn, neumann(implicitfn), implicitfn.Hessian()),
            ),
            "CG, Gauss-Newton": (
                make(base, fixed_cg(base), base.GaussNewton(), base_loss),
                make(implicitfn, fixed_cg(implicitfn), implicitfn.GaussNewton()),
            ),
        }
        methods = {}
        for label, (before, after) in pairs.items():
            methods[f"{label} before"], methods[f"{label} after"] = before, after
        cosines = {key: setup.cosine(fn()) for key, fn in methods.items()}
        with tqdm(total=rounds, desc=name, file=sys.stderr, mininterval=1.0) as bar:
            times = H.interleaved(methods, rounds, bar)
        for label in pairs:
            b, a = times[f"{label} before"], times[f"{label} after"]
            print(
                f"| {name} | {label} | {H.median(b) * 1e3:.2f} | {H.median(a) * 1e3:.2f} | "
                f"**{H.paired_ratio(b, a):.2f}** | {cosines[f'{label} before']:.5f} | "
                f"{cosines[f'{label} after']:.5f} |"
            )


if __name__ == "__main__":
    main()
