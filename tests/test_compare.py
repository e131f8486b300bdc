"""`implicitfn compare`: the runner on a tiny problem, its outputs, and the command line."""

import dataclasses
import json

import pytest
import torch
from tensordict import TensorDict

import implicitfn
from implicitfn.__main__ import main
from implicitfn.compare import (
    CompareConfig,
    Problem,
    format_table,
    make_problem,
    method_names,
    problem_names,
    run,
    save_plot,
    write_outputs,
)

OUTCOMES = {outcome.name.lower() for outcome in implicitfn.Outcome}


def tiny_problem(seed=0):
    """Ridge regression with a log-penalty per weight: 6 parameters, condition number ~ 1e3."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 1.5, 6, dtype=torch.float64)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64) * scales
    y = x @ torch.randn(6, generator=gen, dtype=torch.float64) + torch.randn(
        40, generator=gen, dtype=torch.float64
    )
    x_val = torch.randn(30, 6, generator=gen, dtype=torch.float64) * scales
    y_val = torch.randn(30, generator=gen, dtype=torch.float64)
    loss = implicitfn.CompositeLoss(
        predict=lambda p, h, x, y: x @ p["w"],
        output_loss=lambda out, h, x, y: 0.5 * ((out - y) ** 2).mean(),
        penalty=lambda p, h, x, y: 0.5 * (h["log_penalty"].exp() * p["w"] ** 2).sum(),
    )
    return Problem(
        name="tiny-ridge",
        train_loss=loss,
        outer_loss=lambda p, h, x, y: 0.5 * ((x @ p["w"] - y) ** 2).mean(),
        params=TensorDict(w=torch.zeros(6, dtype=torch.float64)),
        hparams=TensorDict(log_penalty=torch.full((6,), -2.0, dtype=torch.float64)),
        inner_args=(x, y),
        outer_args=(x_val, y_val),
        batches=((x[:20], y[:20]), (x[20:], y[20:])),
    )


FAST = dict(steps=(1, 3, 50), repeats=1, progress=False)


@pytest.fixture(scope="module")
def comparison():
    return run(tiny_problem(), CompareConfig(**FAST))


def records_of(comparison, method, curvature="Hessian"):
    return [r for r in comparison.records if r.method == method and r.curvature == curvature]


def test_every_method_and_curvature_runs(comparison):
    ran = {(r.method, r.curvature) for r in comparison.records}
    for name in method_names():
        if name == "Unrolled":
            assert ("Unrolled", None) in ran
        else:
            assert {(name, "Hessian"), (name, "GaussNewton")} <= ran
    # A newly added solver that cannot be configured from its fields shows up here.
    assert [
        (r.method, r.message) for r in comparison.records if r.status in ("skipped", "error")
    ] == []


def test_dense_entry_matches_the_reference(comparison):
    for curvature in ("Hessian", "GaussNewton"):  # the model is linear: Gauss-Newton is exact
        (dense,) = records_of(comparison, "Dense", curvature)
        assert dense.status == "ok" and dense.outcome == "successful"
        assert dense.relative_error < 1e-10
        assert dense.cosine == pytest.approx(1.0, abs=1e-12)
    assert comparison.reference["dense_relative_residual"] < 1e-12
    assert (
        comparison.reference["inner_converged"]
        and comparison.reference["hessian_positive_definite"]
    )


def test_eigenvalue_estimates_match_the_spectrum(comparison):
    problem = tiny_problem()
    x = problem.inner_args[0]
    hessian = x.T @ x / len(x) + torch.diag(problem.hparams["log_penalty"].exp())
    eigenvalues = torch.linalg.eigvalsh(hessian)
    reference = comparison.reference
    assert reference["hessian_eigenvalue_max"] == pytest.approx(float(eigenvalues[-1]), rel=1e-6)
    assert reference["hessian_eigenvalue_min"] == pytest.approx(float(eigenvalues[0]), rel=1e-6)
    assert reference["unrolled_learning_rate"] == pytest.approx(
        1 / float(eigenvalues[-1]), rel=1e-6
    )


def test_cg_converges_with_enough_steps_and_errors_shrink(comparison):
    cg = records_of(comparison, "CG")
    assert [r.steps for r in cg] == [1, 3, 50]
    assert cg[0].relative_error > cg[1].relative_error > cg[2].relative_error
    assert cg[-1].outcome == "successful" and cg[-1].relative_error < 1e-4
    assert cg[-1].num_steps <= 6
    assert cg[0].outcome == "max_steps_reached" and cg[0].status == "failed"


def test_records_carry_measurements(comparison):
    for record in comparison.records:
        assert -1.0 - 1e-12 <= record.cosine <= 1.0 + 1e-12
        assert record.time_s > 0 and record.time_grad_evals > 0
        assert record.peak_memory_bytes >= 0
        if record.method == "Unrolled":
            assert record.outcome is None and record.relative_residual is None
        else:
            assert record.outcome in OUTCOMES and record.relative_residual >= 0
            # Success is never reported above the tolerance, whatever the solver.
            if record.outcome == "successful":
                assert record.relative_residual <= record.relative_tolerance * (1 + 1e-6)
    unrolled = records_of(comparison, "Unrolled", None)
    assert unrolled[-1].peak_memory_bytes > unrolled[0].peak_memory_bytes  # the graph of k steps


def test_json_table_and_plot_are_written(comparison, tmp_path):
    paths = write_outputs(comparison, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"problem", "environment", "config", "reference", "records"}
    assert data["problem"] == {
        "name": "tiny-ridge",
        "description": "",
        "num_params": 6,
        "num_hparams": 6,
    }
    assert {"torch", "dtype", "device", "threads", "memory_method"} <= set(data["environment"])
    assert {"grad_eval_s", "time_s", "condition_number", "inner_gradient_norm"} <= set(
        data["reference"]
    )
    assert data["config"]["steps"] == [1, 3, 50]
    fields = {
        "method",
        "curvature",
        "steps",
        "solver",
        "status",
        "cosine",
        "relative_error",
        "outcome",
        "relative_residual",
        "relative_tolerance",
        "num_steps",
        "time_s",
        "time_grad_evals",
        "peak_memory_bytes",
        "message",
    }
    assert all(set(record) == fields for record in data["records"])
    assert len(data["records"]) == len(comparison.records)
    table = paths["table"].read_text()
    assert "| method | curvature | k |" in table and "| Dense | Hessian | — | 6 |" in table
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_a_reference_that_is_not_a_minimum_is_flagged(comparison, tmp_path):
    reference = dict(comparison.reference, hessian_positive_definite=False)
    reference.update(hessian_eigenvalue_min=None, condition_number=None)
    flagged = dataclasses.replace(comparison, reference=reference)
    table = format_table(flagged)
    assert "NOT positive definite" in table and "WARNING: the inner problem is not" in table
    assert save_plot(flagged, tmp_path / "plot.png").stat().st_size > 0
    assert "WARNING" not in format_table(comparison)


def test_same_seed_same_table():
    config = CompareConfig(
        steps=(2,), solvers=("CG", "Nystrom", "Unrolled"), repeats=1, memory=False, progress=False
    )
    first, second = (run(tiny_problem(), config) for _ in range(2))
    strip = ("time_s", "time_grad_evals")
    rows = [
        [{k: v for k, v in vars(r).items() if k not in strip} for r in c.records]
        for c in (first, second)
    ]
    assert rows[0] == rows[1]


def test_unrolled_equals_neumann_at_the_same_step():
    config = CompareConfig(
        steps=(2, 5, 6),
        solvers=("Neumann", "Unrolled"),
        curvatures=("Hessian",),
        alpha=1e-3,
        repeats=1,
        memory=False,
        progress=False,
    )
    comparison = run(tiny_problem(), config)
    neumann = {r.steps: r.relative_error for r in records_of(comparison, "Neumann")}
    unrolled = {r.steps: r.relative_error for r in records_of(comparison, "Unrolled", None)}
    for k in (2, 5, 6):  # k unrolled steps from w* sum the same k terms as Neumann(max_steps=k)
        assert unrolled[k] == pytest.approx(neumann[k], rel=1e-9)


def test_too_large_a_step_is_reported_not_hidden():
    config = CompareConfig(
        steps=(20,),
        solvers=("Neumann",),
        curvatures=("Hessian",),
        alpha=1.0,
        repeats=1,
        memory=False,
        progress=False,
    )
    (record,) = run(tiny_problem(), config).records  # alpha * lambda_max ~ 1e3
    assert record.status in ("failed", "nonfinite")
    assert record.status == "nonfinite" or (
        record.outcome == "diverged" and record.relative_residual > 1
    )


def test_gauss_newton_is_skipped_for_a_plain_loss():
    problem = tiny_problem()
    plain = Problem(
        "plain",
        lambda p, h, x, y: problem.train_loss(p, h, x, y),
        problem.outer_loss,
        problem.params,
        problem.hparams,
        problem.inner_args,
        problem.outer_args,
    )
    config = CompareConfig(
        steps=(2,), solvers=("CG", "StochasticNeumann"), repeats=1, memory=False, progress=False
    )
    statuses = {(r.method, r.curvature): (r.status, r.message) for r in run(plain, config).records}
    assert statuses[("CG", "GaussNewton")] == (
        "skipped",
        "the training loss is not an implicitfn.CompositeLoss",
    )
    assert statuses[("CG", "Hessian")][0] == "failed"  # ran: 2 steps are too few
    assert statuses[("StochasticNeumann", "Hessian")][0] == "skipped"
    assert "no minibatches" in statuses[("StochasticNeumann", "Hessian")][1]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {"solvers": ("CG", "Bogus")},
            r"solvers: unknown name\(s\) \['Bogus'\]; choose from \['CG'",
        ),
        (
            {"curvatures": ("Fisher",)},
            r"curvatures: unknown name\(s\) \['Fisher'\]; choose from \['Hessian', 'GaussNewton'\]",
        ),
        ({"steps": (0, 5)}, "steps: expected positive ints"),
        ({"alpha": -1.0}, "alpha: expected 'auto' or a float > 0"),
        ({"repeats": 0}, "repeats: expected an int >= 1"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        CompareConfig(**overrides)


def test_config_accepts_names_in_any_case():
    config = CompareConfig(
        solvers=("cg", "CG", "unrolled", "cg-JACOBI"), curvatures=("gauss-newton",)
    )
    assert config.solvers == ("CG", "Unrolled", "CG-jacobi")
    assert config.curvatures == ("GaussNewton",)


def test_problem_and_make_problem_check_their_arguments():
    with pytest.raises(
        ValueError, match=r"problem: unknown name 'mnist'; choose one of \['logreg'"
    ):
        make_problem("mnist")
    with pytest.raises(TypeError, match="params: expected a TensorDict, dict or tensor"):
        Problem("p", lambda p, h: p.sum(), lambda p, h: p.sum(), [1.0], torch.ones(1))
    with pytest.raises(TypeError, match="outer_loss: expected a callable"):
        Problem("p", lambda p, h: p.sum(), "loss", torch.ones(1), torch.ones(1))


def test_built_in_problems_have_the_advertised_sizes():
    assert problem_names() == ["logreg", "mlp-small", "mlp"]
    sizes = {
        name: (make_problem(name).num_params, make_problem(name).num_hparams)
        for name in problem_names()
    }
    assert sizes == {"logreg": (650, 650), "mlp-small": (2410, 2410), "mlp": (9610, 9610)}
    first, again, other = (
        make_problem("mlp-small"),
        make_problem("mlp-small"),
        make_problem("mlp-small", seed=1),
    )
    assert torch.equal(first.params["0", "weight"], again.params["0", "weight"])
    assert not torch.equal(first.params["0", "weight"], other.params["0", "weight"])
    assert make_problem("logreg", dtype=torch.float32).inner_args[0].dtype == torch.float32


def test_command_line_runs_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "results"
    status = main(
        [
            "compare",
            "--solvers",
            "CG,Identity,Unrolled",
            "--curvatures",
            "Hessian",
            "--steps",
            "2,40",
            "--repeats",
            "1",
            "--no-memory",
            "--no-progress",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0
    assert "Problem `logreg`" in printed and "| CG | Hessian | 40 |" in printed
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "compare.png"]
    records = json.loads((out / "compare.json").read_text())["records"]
    assert [(r["method"], r["steps"]) for r in records] == [
        ("CG", 2),
        ("CG", 40),
        ("Identity", None),
        ("Unrolled", 2),
        ("Unrolled", 40),
    ]
    assert records[1]["relative_error"] < 1e-2 < records[0]["relative_error"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--problem", "cifar"], "invalid choice: 'cifar' (choose from 'logreg', 'mlp-small'"),
        (["--solvers", "CG,LSQR"], "solvers: unknown name(s) ['LSQR']; choose from ['CG'"),
        (["--steps", "1,x"], "expected comma-separated integers"),
        (["--device", "quantum"], "--device: 'quantum' is not a torch device"),
        (["--alpha", "big"], "expected 'auto' or a number"),
        (["--repeats", "0"], "repeats: expected an int >= 1, got 0"),
        (["--steps", ","], "steps: expected positive ints"),
        (["--seed", "-1"], "seed: expected an int >= 0, got -1"),
    ],
)
def test_command_line_errors_say_what_is_valid(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unavailable_device_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["compare", "--device", "cuda"])
    assert "CUDA is not available here" in capsys.readouterr().err
