"""`python -m implicitfn` and the `implicitfn` console script."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="implicitfn", description="Hypergradients by implicit differentiation."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    compare = commands.add_parser(
        "compare",
        help="compare every linear solver and curvature (and unrolling) against the exact "
        "hypergradient on a built-in problem",
        description="Train a built-in problem tightly, compute the exact hypergradient by a dense "
        "solve, then run every linear solver x curvature x budget and unrolled differentiation, "
        "recording accuracy, the solver's report, time in gradient evaluations and peak memory.",
    )
    try:
        from implicitfn.compare import cli
    except ModuleNotFoundError as missing:  # the comparison's extras are not core dependencies
        print(
            f"implicitfn compare needs {missing.name}: pip install 'implicitfn[examples]' "
            "(scikit-learn, matplotlib, tqdm).",
            file=sys.stderr,
        )
        return 2
    cli.add_arguments(compare)
    args = parser.parse_args(argv)
    return cli.run_command(args, compare)


if __name__ == "__main__":
    sys.exit(main())
