"""What a comparison leaves behind: a Markdown table, a JSON file and a plot."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from implicitfn.compare.runner import Comparison, Record

__all__ = ["format_table", "save_json", "save_plot", "write_outputs"]

_COLUMNS = (
    "method",
    "curvature",
    "k",
    "products",
    "cosine",
    "rel. error",
    "rel. residual",
    "tolerance",
    "outcome",
    "time [grad evals]",
    "peak memory [MiB]",
    "note",
)


def format_table(comparison: Comparison) -> str:
    """A Markdown table of the records, under a few lines that describe the setting.

    **Arguments:**

    - `comparison`: a [`Comparison`][implicitfn.compare.Comparison].

    **Returns:** the text (it reads well in a terminal and renders as a table in Markdown).

    ```python
    >>> import torch
    >>> from implicitfn.compare import CompareConfig, Problem, format_table, run
    >>> problem = Problem("quadratic", lambda p, h: ((p - h) ** 2).sum() + (p ** 4).sum(),
    ...                   lambda p, h: p.sum(), torch.zeros(3, dtype=torch.float64),
    ...                   torch.ones(3, dtype=torch.float64))
    >>> config = CompareConfig(steps=(1,), solvers=("Dense",), curvatures=("Hessian",),
    ...                        repeats=1, memory=False, progress=False)
    >>> print(format_table(run(problem, config)).splitlines()[-1])  # doctest: +ELLIPSIS
    | Dense | Hessian | — | 3 | 1.000000 | ... | ... | 1e-05 | successful | ... | — |  |
    ```
    """
    problem, reference, environment = (
        comparison.problem,
        comparison.reference,
        comparison.environment,
    )
    if reference["hessian_positive_definite"]:
        spectrum = (
            f"eigenvalues in [{reference['hessian_eigenvalue_min']:.3g}, "
            f"{reference['hessian_eigenvalue_max']:.3g}], condition number "
            f"{reference['condition_number']:.3g}"
        )
    else:
        spectrum = (
            f"NOT positive definite, largest eigenvalue {reference['hessian_eigenvalue_max']:.3g}"
        )
    lines = [
        f"Problem `{problem['name']}`: {problem['description']}.",
        f"{problem['num_params']} parameters, {problem['num_hparams']} hyperparameters; "
        f"Hessian at the optimum: {spectrum}; training gradient norm there "
        f"{reference['inner_gradient_norm']:.1e}.",
        f"One training-loss gradient: {1e3 * reference['grad_eval_s']:.3g} ms (median; the unit "
        "of time, re-timed next to each row); "
        f"dense reference: {reference['time_s']:.1f} s, relative residual "
        f"{reference['dense_relative_residual']:.1e}; unrolled learning rate "
        f"{reference['unrolled_learning_rate']:.3g}.",
        f"torch {environment['torch']}, {environment['dtype']}, {environment['device']}, "
        f"{environment['threads']} thread(s).",
    ]
    if not (reference["inner_converged"] and reference["hessian_positive_definite"]):
        lines.append(
            "WARNING: the inner problem is not at a strict local minimum (gradient not ~0 or "
            "Hessian not positive definite): the reference is not a true hypergradient."
        )
    lines += [
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join(" --- " for _ in _COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_cells(record)) + " |" for record in comparison.records]
    return "\n".join(lines)


def _cells(record: Record) -> list[str]:
    def number(value: float | None, spec: str) -> str:
        return "—" if value is None or not math.isfinite(value) else format(value, spec)

    memory = None if record.peak_memory_bytes is None else record.peak_memory_bytes / 2**20
    note = "" if record.status == "ok" else record.status
    if record.message and record.status in ("skipped", "error", "nonfinite"):
        note = f"{record.status}: {record.message}"
    return [
        record.method,
        record.curvature or "—",
        "—" if record.steps is None else str(record.steps),
        "—" if record.num_steps is None else str(record.num_steps),
        number(record.cosine, ".6f"),
        number(record.relative_error, ".2e"),
        number(record.relative_residual, ".1e"),
        number(record.relative_tolerance, ".0e"),
        record.outcome or "—",
        number(record.time_grad_evals, ".1f"),
        number(memory, ".2f"),
        note.replace("|", "/"),
    ]


def save_json(comparison: Comparison, path: str | pathlib.Path) -> pathlib.Path:
    """Write `comparison.to_dict()` as JSON (NaN and Inf as `null`).

    **Arguments:**

    - `comparison`: a [`Comparison`][implicitfn.compare.Comparison].
    - `path`: the file to write; its folder must exist.

    **Returns:** the path written.

    ```python
    >>> import json, tempfile, pathlib
    >>> from implicitfn.compare import Comparison, save_json
    >>> comparison = Comparison({"name": "none"}, {}, {}, {}, ())
    >>> path = save_json(comparison, pathlib.Path(tempfile.mkdtemp()) / "compare.json")
    >>> json.loads(path.read_text())["problem"]
    {'name': 'none'}
    ```
    """
    path = pathlib.Path(path)
    path.write_text(json.dumps(comparison.to_dict(), indent=2, allow_nan=False) + "\n")
    return path


def save_plot(comparison: Comparison, path: str | pathlib.Path) -> pathlib.Path:
    """Plot the relative error against the budget $k$ and against time, per method × curvature.

    Methods without a budget (Dense, Identity) are horizontal dotted lines on the left and single
    markers on the right. Rows without a finite error (skipped, diverged) are left out; the table
    lists them.

    **Arguments:**

    - `comparison`: a [`Comparison`][implicitfn.compare.Comparison].
    - `path`: the image to write (`.png`, `.svg`, `.pdf`); its folder must exist.

    **Returns:** the path written.

    ```python
    >>> import tempfile, pathlib
    >>> from implicitfn.compare import Comparison, Record, save_plot
    >>> records = tuple(Record("CG", "Hessian", k, "CG()", "ok", relative_error=10.0 ** -k,
    ...                        time_grad_evals=3.0 * k) for k in (1, 2, 5))
    >>> reference = {"condition_number": 100.0}
    >>> problem = {"name": "toy", "num_params": 5}
    >>> comparison = Comparison(problem, {"threads": 1}, {}, reference, records)
    >>> save_plot(comparison, pathlib.Path(tempfile.mkdtemp()) / "compare.png").stat().st_size > 0
    True
    ```
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    figure = Figure(figsize=(13, 5.5), layout="constrained")
    by_steps, by_time = figure.subplots(1, 2, sharey=True)
    shades = matplotlib.colormaps["tab20"].colors
    palette = shades[::2] + shades[1::2]  # the ten dark shades first, then their light partners
    markers = "os^vDP*Xph<>"
    colors: dict[str, Any] = {}
    for (method, curvature), records in _groups(comparison.records).items():
        color = colors.setdefault(method, palette[len(colors) % len(palette)])
        marker = markers[list(colors).index(method) % len(markers)]
        style = {"color": color, "linestyle": "--" if curvature == "GaussNewton" else "-"}
        label = method if curvature is None else f"{method} · {curvature}"
        errors = [max(r.relative_error, 1e-16) for r in records]
        times = [r.time_grad_evals for r in records]
        if records[0].steps is None:
            by_steps.axhline(errors[0], linewidth=1, **{**style, "linestyle": ":"})
            by_time.plot(
                times, errors, marker="*", markersize=11, linestyle="none", label=label, color=color
            )
        else:
            by_steps.plot([r.steps for r in records], errors, marker=marker, markersize=4, **style)
            by_time.plot(times, errors, marker=marker, markersize=4, label=label, **style)
    for axis in (by_steps, by_time):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    by_steps.set_xlabel("budget k (max_steps / steps / rank; unrolled steps)")
    by_steps.set_ylabel("relative error to the dense reference")
    by_time.set_xlabel("time [training-loss gradient evaluations]")
    problem, condition = comparison.problem, comparison.reference.get("condition_number")
    spectrum = (
        "Hessian not positive definite"
        if condition is None
        else f"condition number {condition:.3g}"
    )
    figure.suptitle(
        f"{problem['name']}: n = {problem.get('num_params')}, {spectrum}, "
        f"{comparison.environment.get('threads')} thread(s)"
    )
    if colors:  # an empty legend would warn
        figure.legend(loc="outside right center", fontsize="small")
    path = pathlib.Path(path)
    figure.savefig(path, dpi=110)
    return path


def _groups(records: tuple[Record, ...]) -> dict[tuple[str, str | None], list[Record]]:
    groups: dict[tuple[str, str | None], list[Record]] = {}
    for record in records:
        if record.relative_error is not None and math.isfinite(record.relative_error):
            groups.setdefault((record.method, record.curvature), []).append(record)
    return groups


def write_outputs(comparison: Comparison, folder: str | pathlib.Path) -> dict[str, Any]:
    """Write `compare.md` (the table), `compare.json` and `compare.png` into `folder`.

    **Arguments:**

    - `comparison`: a [`Comparison`][implicitfn.compare.Comparison].
    - `folder`: the output folder.

    **Returns:** `{"table": path, "json": path, "plot": path}`.

    ```python
    >>> import tempfile, pathlib
    >>> from implicitfn.compare import Comparison, write_outputs
    >>> reference = {"hessian_positive_definite": True, "hessian_eigenvalue_min": 1.0,
    ...              "hessian_eigenvalue_max": 2.0, "condition_number": 2.0, "grad_eval_s": 1e-3,
    ...              "inner_gradient_norm": 0.0, "inner_converged": True, "time_s": 0.1,
    ...              "dense_relative_residual": 0.0, "unrolled_learning_rate": 0.5}
    >>> comparison = Comparison({"name": "none", "description": "", "num_params": 1,
    ...                          "num_hparams": 1}, {"torch": "2", "dtype": "float64",
    ...                          "device": "cpu", "threads": 1}, {}, reference, ())
    >>> sorted(write_outputs(comparison, pathlib.Path(tempfile.mkdtemp()) / "out"))
    ['json', 'plot', 'table']
    ```
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "compare.md"
    table.write_text(format_table(comparison) + "\n")
    return {
        "table": table,
        "json": save_json(comparison, folder / "compare.json"),
        "plot": save_plot(comparison, folder / "compare.png"),
    }
