"""mkdocs hook: list every documentation page in the navigation, including pages added later.

`mkdocs.yml` names the pages that exist; this hook adds any other Markdown page under `docs/`
(outside `api/`) where it belongs, so a new page shows up in the navigation (and does not sit
orphaned outside it) before anyone edits `mkdocs.yml`: `tutorials/*.md` to "Tutorials",
`compare.md` and `solvers-advanced.md` after the solver guide, any other page among the guides,
just before the API reference. Each addition is logged.
"""

from __future__ import annotations

import logging
import pathlib

log = logging.getLogger("mkdocs.hooks.nav")

AFTER_SOLVER_GUIDE = ("compare.md", "solvers-advanced.md")
SOLVER_GUIDE = "choosing-a-solver.md"
TUTORIALS = "Tutorials"
API_REFERENCE = "API reference"


def _paths(item) -> list[str]:
    if isinstance(item, str):
        return [item]
    if isinstance(item, dict):
        return [p for value in item.values() for p in _paths(value)]
    if isinstance(item, list):
        return [p for value in item for p in _paths(value)]
    return []


def _position(nav: list, target: str) -> int | None:
    for i, item in enumerate(nav):
        if target in _paths(item):
            return i
    return None


def on_config(config):
    nav = config.nav
    if not nav:
        return config
    docs = pathlib.Path(config.docs_dir)
    listed = set(_paths(nav))
    pages = sorted(
        path.relative_to(docs).as_posix()
        for path in docs.rglob("*.md")
        if path.relative_to(docs).parts[0] not in ("api", "javascripts")
    )
    missing = [page for page in pages if page not in listed]
    for page in [p for p in AFTER_SOLVER_GUIDE if p in missing]:
        where = _position(nav, SOLVER_GUIDE)
        nav.insert(len(nav) if where is None else where + 1, page)
        log.info("nav: added %s after %s", page, SOLVER_GUIDE)
    tutorials = [p for p in missing if p.startswith("tutorials/")]
    guides = [p for p in missing if p not in AFTER_SOLVER_GUIDE and p not in tutorials]
    for page in guides:
        where = next(
            (i for i, item in enumerate(nav) if isinstance(item, dict) and API_REFERENCE in item),
            len(nav),
        )
        nav.insert(where, page)
        log.info("nav: added %s before the %s", page, API_REFERENCE)
    if tutorials:
        section = next((item for item in nav if isinstance(item, dict) and TUTORIALS in item), None)
        if section is None:
            section = {TUTORIALS: []}
            where = _position(nav, SOLVER_GUIDE)
            nav.insert(len(nav) if where is None else where, section)
        section[TUTORIALS].extend(tutorials)
        log.info("nav: added %s to %s", ", ".join(tutorials), TUTORIALS)
    return config
