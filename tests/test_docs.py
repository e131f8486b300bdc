"""Every public name is documented with a runnable example and listed in the API docs; the
examples in docstrings and in the Markdown pages run."""

import doctest
import importlib
import pathlib
import pkgutil
import re
import types

import pytest

import implicitfn
import implicitfn.compare

ROOT = pathlib.Path(__file__).resolve().parents[1]
API_PAGES = "\n".join(path.read_text() for path in (ROOT / "docs" / "api").glob("*.md"))


def public_names():
    """(dotted name, object) for implicitfn.__all__, expanding public subpackages, and for
    implicitfn.compare (public, but not imported by `import implicitfn`)."""
    modules = {"compare": implicitfn.compare}
    for name in implicitfn.__all__:
        obj = getattr(implicitfn, name)
        if isinstance(obj, types.ModuleType):
            modules[name] = obj
        else:
            yield name, obj
    for prefix, module in modules.items():
        for inner in module.__all__:
            yield f"{prefix}.{inner}", getattr(module, inner)


@pytest.mark.parametrize(
    "name, obj", list(public_names()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_public_name_has_api_entry_and_example(name, obj):
    assert re.search(rf"^::: implicitfn\.{re.escape(name)}\s*$", API_PAGES, re.M), (
        f"add '::: implicitfn.{name}' to a page in docs/api/"
    )
    assert obj.__doc__ and ">>>" in obj.__doc__, f"{name} needs a docstring with a >>> example"


class FencedDocTestParser(doctest.DocTestParser):
    """Docstrings wrap examples in Markdown fences; a closing fence ends the expected output."""

    def parse(self, string, name="<string>"):
        return super().parse(re.sub(r"^\s*```\w*\s*$", "", string, flags=re.M), name)


def docstring_tests():
    finder = doctest.DocTestFinder(parser=FencedDocTestParser(), exclude_empty=True)
    seen, tests = set(), []
    for module_info in pkgutil.walk_packages(implicitfn.__path__, "implicitfn."):
        if module_info.name.endswith("__main__"):
            continue
        for test in finder.find(importlib.import_module(module_info.name)):
            if test.examples and test.name not in seen:
                seen.add(test.name)
                tests.append(test)
    return tests


@pytest.mark.parametrize("test", docstring_tests(), ids=lambda t: t.name)
def test_docstring_examples_run(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=lambda text: None)
    assert runner.failures == 0, (
        f"{test.name}: {runner.failures} failing example(s); run it with doctest -v"
    )


PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if "api" not in p.parts) + [
    ROOT / "README.md"
]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_code_blocks_run(page, tmp_path, monkeypatch):
    """A page's Python blocks run in order in one namespace; a block starting `# not run` is skipped."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_page"}
    for block in PYTHON_BLOCK.findall(page.read_text()):
        if block.lstrip().startswith(("# not run", ">>>")):
            continue
        exec(compile(block, str(page), "exec"), namespace)
