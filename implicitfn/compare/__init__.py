"""`implicitfn compare`: how good is each inverse-Hessian-vector-product approximation, and at
what cost.

Run it as `python -m implicitfn compare` (see `--help`), or from Python with
[`make_problem`][implicitfn.compare.make_problem] and [`run`][implicitfn.compare.run].
Built only on the public names of `implicitfn`.
"""

from implicitfn.compare.methods import method_names
from implicitfn.compare.problems import Problem, make_problem, problem_names, train_to_optimum
from implicitfn.compare.report import format_table, save_json, save_plot, write_outputs
from implicitfn.compare.runner import CompareConfig, Comparison, Record, run

__all__ = [
    "CompareConfig",
    "Comparison",
    "Problem",
    "Record",
    "format_table",
    "make_problem",
    "method_names",
    "problem_names",
    "run",
    "save_json",
    "save_plot",
    "train_to_optimum",
    "write_outputs",
]
