"""The `implicitfn compare` command line: arguments in, a table, JSON and a plot out."""

from __future__ import annotations

import argparse

import torch

from implicitfn.compare.methods import method_names
from implicitfn.compare.problems import make_problem, problem_names
from implicitfn.compare.report import format_table, write_outputs
from implicitfn.compare.runner import CompareConfig, run

DEFAULT_PROBLEM = "logreg"
FAST_STEPS = (1, 5, 20)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `implicitfn compare`."""
    default = CompareConfig()
    parser.add_argument(
        "--problem",
        choices=problem_names(),
        default=DEFAULT_PROBLEM,
        help=f"built-in problem (default: {DEFAULT_PROBLEM})",
    )
    parser.add_argument(
        "--solvers",
        type=_names,
        help=f"comma-separated methods (default: all): {', '.join(method_names())}",
    )
    parser.add_argument(
        "--curvatures",
        type=_names,
        default=default.curvatures,
        help="comma-separated: Hessian, GaussNewton (default: both)",
    )
    parser.add_argument(
        "--steps",
        type=_step_list,
        help="comma-separated budgets k (default: "
        f"{','.join(map(str, default.steps))}; --fast: {','.join(map(str, FAST_STEPS))})",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float64")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the data split and the initial weights (default: 0)",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        default=default.rtol,
        help=f"tolerance of the solvers that stop on their own (default: {default.rtol:g})",
    )
    parser.add_argument(
        "--alpha",
        type=_alpha,
        default=default.alpha,
        help="step of Neumann/FixedPoint/StochasticNeumann and learning rate of "
        "unrolling: auto (1/largest eigenvalue, default) or a number",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"timed runs per method, fastest counts (default: {default.repeats}; --fast: 1)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice, e.g. OMP_NUM_THREADS)",
    )
    parser.add_argument(
        "--out",
        default="compare-results",
        help="folder for compare.md, compare.json, compare.png (default: compare-results)",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help=f"budgets {','.join(map(str, FAST_STEPS))} and one timed run: for CI and `make demo`",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _step_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(step) for step in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 1,5,20, got {text!r}"
        ) from None


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


def _device(text: str) -> torch.device:
    """The device, or ValueError saying why it cannot be used."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device: {text!r} is not a torch device; use cpu or cuda.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {text}: CUDA is not available here (torch {torch.__version__}, "
                "torch.cuda.is_available() is False); use --device cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {text}: there are {torch.cuda.device_count()} CUDA device(s); "
                f"use an index below that."
            )
    elif device.type != "cpu":
        raise ValueError(f"--device {text}: only cpu and cuda are supported.")
    return device


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run `implicitfn compare` with parsed `args`; usage errors go through `parser.error`."""
    defaults = CompareConfig()
    try:
        device = _device(args.device)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads: expected a positive int, got {args.threads}.")
        fast_or_default_steps = FAST_STEPS if args.fast else defaults.steps
        fast_or_default_repeats = 1 if args.fast else defaults.repeats
        config = CompareConfig(
            steps=fast_or_default_steps if args.steps is None else args.steps,
            solvers=args.solvers,
            curvatures=args.curvatures,
            rtol=args.rtol,
            alpha=args.alpha,
            repeats=fast_or_default_repeats if args.repeats is None else args.repeats,
            memory=not args.no_memory,
            progress=not args.no_progress,
        )
        problem = make_problem(
            args.problem, dtype=DTYPES[args.dtype], device=device, seed=args.seed
        )
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    comparison = run(problem, config)
    print(format_table(comparison))
    paths = write_outputs(comparison, args.out)
    print("\nwrote " + ", ".join(str(path) for path in paths.values()))
    errors = [r for r in comparison.records if r.status == "error"]
    if errors:
        print(f"{len(errors)} method(s) raised an error (see the note column).")
    return 1 if errors else 0
