"""The package's layout shows its architecture: imports only point down the floors.

Floors, bottom first (see ../shared/DESIGN.md): a module may import modules of a lower floor and,
inside a subpackage, its own siblings; the applications (hyperopt, compare) use public names only.
"""

from __future__ import annotations

import ast
import pathlib

import implicitfn

PACKAGE = pathlib.Path(implicitfn.__file__).parent
FLOORS = [
    ["_tree"],
    ["_solution"],
    ["_inputs"],
    ["_operator", "_functional", "_projections"],
    ["_curvature", "_distributed"],
    ["_optimality", "_linear_solve"],
    ["_compile", "_proximal", "_kkt"],
    ["_passes"],
    ["_adjoint"],
    ["_implicit", "_unrolled"],
    ["_minimize"],
    ["__init__", "testing"],
    ["hyperopt", "compare", "__main__"],
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}
APPLICATIONS = {"hyperopt", "compare", "__main__"}


def top_module(path: pathlib.Path) -> str:
    """The floor name of a file: its first component below the package (without `.py`)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported(path: pathlib.Path) -> list[str]:
    """The implicitfn modules `path` imports, as floor names (`implicitfn` itself: `__init__`)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "implicitfn":
                continue
            if len(parts) > 1:
                names.append(parts[1])
            else:  # `from implicitfn import x`: x is a submodule or a public name
                names += [a.name if a.name in FLOOR else "__init__" for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "implicitfn":
                    names.append(parts[1] if len(parts) > 1 else "__init__")
    return names


def test_every_module_has_a_floor():
    modules = {top_module(p) for p in PACKAGE.rglob("*.py")}
    assert modules <= set(FLOOR), f"give these modules a floor: {sorted(modules - set(FLOOR))}"


def test_imports_only_point_down():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        here = top_module(path)
        for target in imported(path):
            if target == here:
                continue  # a subpackage importing its own modules
            if here in APPLICATIONS:
                if target != "__init__" and target not in APPLICATIONS:
                    upward.append(f"{path.relative_to(PACKAGE)} uses private implicitfn.{target}")
            elif FLOOR[target] >= FLOOR[here]:
                upward.append(
                    f"{path.relative_to(PACKAGE)} imports {target} (floor {FLOOR[target]} >= {FLOOR[here]})"
                )
    assert not upward, "\n".join(upward)


def test_the_core_does_not_import_the_applications():
    assert not set(imported(PACKAGE / "__init__.py")) & APPLICATIONS


def test_no_module_exceeds_600_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long, long
