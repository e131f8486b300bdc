"""The documentation tooling: the browser check's CI contract and the navigation hook.

The browser check itself (scripts/browser_check.py, `make browser-check`) needs Chromium and
runs in CI after `make test`; these tests only pin down what must not silently change.
"""

import importlib.util
import pathlib
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("ci, status", [("true", 1), ("", 0)])
def test_browser_check_fails_without_chromium_only_under_ci(
    ci, status, monkeypatch, tmp_path, capsys
):
    browser_check = load("browser_check")
    monkeypatch.setenv("CI", ci)
    missing = str(tmp_path / "no-chromium")
    assert browser_check.main(["--chromium", missing, "--out", str(tmp_path / "shots")]) == status
    output = capsys.readouterr()
    assert ("ERROR" in output.err) if status else ("SKIPPED" in output.out)


def test_nav_hook_lists_pages_missing_from_mkdocs_yml(tmp_path):
    hooks = load("mkdocs_hooks")
    pages = (
        "index.md",
        "choosing-a-solver.md",
        "compare.md",
        "tutorials/new.md",
        "guide.md",
        "api/x.md",
    )
    for page in pages:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / page).write_text("# page\n")
    nav = [
        {"Home": "index.md"},
        {"How to choose a solver": "choosing-a-solver.md"},
        {"API reference": [{"X": "api/x.md"}]},
    ]
    config = types.SimpleNamespace(nav=nav, docs_dir=str(tmp_path))
    hooks.on_config(config)
    guide = nav.index({"How to choose a solver": "choosing-a-solver.md"})
    assert nav[guide + 1] == "compare.md"  # right after the solver guide
    assert nav[guide - 1] == {"Tutorials": ["tutorials/new.md"]}  # a new section before it
    assert nav[-2:] == ["guide.md", {"API reference": [{"X": "api/x.md"}]}]  # other pages
