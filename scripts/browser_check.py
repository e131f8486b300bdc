"""Load the built documentation site in a real, headless Chromium and check what a reader sees.

Serves the site on 127.0.0.1 (a free port, `python -m http.server`), then with Playwright
driving the system's Chromium (Debian's `chromium` package, never a browser that a tool
downloads):

1. the home page loads, its formulas are typeset by KaTeX (`.katex` elements, no
   `.katex-error`) and KaTeX's own fonts are loaded;
2. clicking "Concepts" in the navigation reaches the Concepts page, whose formulas are typeset
   too (after the theme's instant navigation, and again on a fresh load);
3. typing "Neumann" into the search box lists results that mention it, and the first one opens;
4. every page of the site loads with its formulas typeset and no `.katex-error`;
5. no request leaves 127.0.0.1 (the site works offline: no CDN, no web fonts from elsewhere) and
   no page raises a JavaScript error.

Screenshots of each step go to the folder given by `--out` (default `site-check/`), whose path
is printed. Exit status 0 when every check passed, 1 otherwise.

When Chromium or Playwright is missing the check is skipped with a message, except under CI
(`CI=true`) or with `--require`, where that is a failure.

    python scripts/browser_check.py                 # builds the site into a temporary folder
    python scripts/browser_check.py --site site     # checks an existing `mkdocs build`
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SEARCH_TERM = "Neumann"
TIMEOUT_MS = 20_000

# Run in the page: how many maths spans pymdownx.arithmatex emitted, and how many KaTeX typeset.
MATHS_STATE = """() => {
  const spans = [...document.querySelectorAll('.arithmatex')];
  return {
    spans: spans.length,
    typeset: spans.filter((s) => s.querySelector('.katex')).length,
    katex: document.querySelectorAll('.katex').length,
    display: document.querySelectorAll('.katex-display').length,
    errors: document.querySelectorAll('.katex-error').length,
  };
}"""
ALL_TYPESET = """() => {
  const spans = [...document.querySelectorAll('.arithmatex')];
  return spans.length > 0 && spans.every((s) => s.querySelector('.katex'));
}"""
KATEX_FONTS = """async () => {
  await document.fonts.ready;
  return [...document.fonts]
    .filter((f) => f.family.replace(/["']/g, '').startsWith('KaTeX_') && f.status === 'loaded')
    .map((f) => f.family.replace(/["']/g, ''));
}"""


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no")


def find_chromium(explicit: str | None) -> str | None:
    """`--chromium`, else `$CHROMIUM`, else /usr/bin/chromium or `chromium` on the PATH."""
    chosen = explicit or os.environ.get("CHROMIUM")
    if chosen:  # asked for one: that one or none
        return chosen if os.access(chosen, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(site: pathlib.Path) -> Iterator[str]:
    """Serve `site` on 127.0.0.1 at a free port; yields the base URL."""
    for _attempt in range(3):  # the port could be taken between choosing and binding it
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
             "--directory", str(site)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(base, timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        if server.poll() is None:
            break
    else:
        raise RuntimeError("could not start python -m http.server on 127.0.0.1")
    try:
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)


def build_site(target: pathlib.Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(target)],
        cwd=ROOT,
        check=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


class Checks:
    """Collects results; each check prints one line."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, ok: bool, what: str, detail: object = "") -> bool:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail != "" else ""))
        if not ok:
            self.failures.append(what)
        return ok


def check_maths(page, checks: Checks, where: str, minimum: int) -> None:
    try:
        page.wait_for_function(ALL_TYPESET, timeout=TIMEOUT_MS)
    except Exception:  # reported through the counts below
        pass
    state = page.evaluate(MATHS_STATE)
    checks.expect(
        state["spans"] >= minimum and state["typeset"] == state["spans"],
        f"{where}: every formula typeset by KaTeX",
        f"{state['typeset']}/{state['spans']} formulas, {state['katex']} .katex elements "
        f"({state['display']} display)",
    )
    checks.expect(state["errors"] == 0, f"{where}: no .katex-error", state["errors"])


def site_pages(site: pathlib.Path) -> list[str]:
    """The pages of a built site as paths relative to its root ('' for the home page)."""
    pages = []
    for index in sorted(site.rglob("index.html")):
        relative = index.parent.relative_to(site).as_posix()
        pages.append("" if relative == "." else relative + "/")
    return pages


def run_checks(chromium: str, base: str, out: pathlib.Path, pages: list[str]) -> list[str]:
    from playwright.sync_api import sync_playwright

    checks = Checks()
    external: list[str] = []
    js_errors: list[str] = []

    def keep_local(route) -> None:
        url = route.request.url
        if url.startswith(base):
            route.continue_()
        else:
            external.append(url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, headless=True
        )
        print(f"browser: {chromium} (Chromium {browser.version})")
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.route("**/*", keep_local)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda error: js_errors.append(str(error)))

        print("home page")
        page.goto(base, wait_until="load")
        checks.expect("implicitfn" in page.title(), "home: title", page.title())
        check_maths(page, checks, "home", minimum=1)
        fonts = page.evaluate(KATEX_FONTS)
        checks.expect("KaTeX_Main" in fonts, "home: KaTeX fonts loaded from the site",
                      ", ".join(sorted(set(fonts))))
        page.screenshot(path=out / "1-home.png")

        print("navigation")
        link = page.locator(".md-sidebar--primary").get_by_role("link", name="Concepts", exact=True)
        link.first.click()
        page.wait_for_url("**/concepts/")
        heading = page.locator("article h1").first.inner_text()
        checks.expect(heading.strip().startswith("Concepts"), "nav link opens Concepts", page.url)
        check_maths(page, checks, "concepts (after navigation)", minimum=10)
        page.screenshot(path=out / "2-concepts-via-nav.png")

        print("concepts page, fresh load")
        page.goto(base + "concepts/", wait_until="load")
        check_maths(page, checks, "concepts", minimum=10)
        page.screenshot(path=out / "3-concepts-full.png", full_page=True)

        print(f"search for {SEARCH_TERM!r}")
        page.goto(base, wait_until="load")
        search = page.locator("input.md-search__input")
        search.click()
        page.keyboard.type(SEARCH_TERM, delay=40)
        results = page.locator(".md-search-result__item")
        try:
            results.first.wait_for(state="visible")
        except Exception:
            pass
        count = results.count()
        texts = results.all_inner_texts() if count else []
        hits = [t for t in texts if SEARCH_TERM.lower() in t.lower()]
        meta = page.locator(".md-search-result__meta").first.inner_text() if count else ""
        checks.expect(count > 0 and bool(hits), f"search lists results for {SEARCH_TERM!r}",
                      f"{count} items ({meta.strip()})")
        typeset = page.locator(".md-search-result .katex").count()
        print(f"  info formulas typeset in the search previews: {typeset}")
        page.screenshot(path=out / "4-search.png")
        if count:
            page.locator(".md-search-result__item a").first.click()
            page.wait_for_load_state("load")
            body = page.locator("article").first.inner_text()
            checks.expect(SEARCH_TERM in body, "the first search result opens a page about it",
                          page.url)
            page.screenshot(path=out / "5-search-result.png")

        print(f"every page ({len(pages)})")
        untypeset = []
        for path in pages:
            page.goto(base + path, wait_until="load")
            if page.locator(".arithmatex").count():
                try:
                    page.wait_for_function(ALL_TYPESET, timeout=5_000)
                except Exception:
                    pass
            state = page.evaluate(MATHS_STATE)
            if state["typeset"] < state["spans"] or state["errors"]:
                untypeset.append(f"/{path} ({state['typeset']}/{state['spans']} typeset, "
                                 f"{state['errors']} errors)")
        checks.expect(not untypeset, f"all {len(pages)} pages: formulas typeset, no .katex-error",
                      "; ".join(untypeset))

        browser.close()

    checks.expect(not external, "no request left 127.0.0.1", external[:5] or "")
    checks.expect(not js_errors, "no JavaScript errors", js_errors[:5] or "")
    return checks.failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=pathlib.Path, help="a built site (default: build one)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "site-check",
                        help="folder for the screenshots (default: site-check/)")
    parser.add_argument("--chromium", help="the Chromium executable (default: $CHROMIUM, else "
                        "/usr/bin/chromium)")
    parser.add_argument("--require", action="store_true",
                        help="fail instead of skipping when Chromium or Playwright is missing "
                        "(implied by CI=true)")
    args = parser.parse_args(argv)
    require = args.require or truthy(os.environ.get("CI"))

    chromium = find_chromium(args.chromium)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the Playwright package (pip install -e '.[docs]')"
    else:
        missing = None if chromium else "Chromium (apt-get install chromium)"
    if missing:
        if require:
            print(f"ERROR: browser check cannot run: {missing} is missing.", file=sys.stderr)
            return 1
        print(f"SKIPPED: browser check needs {missing}; under CI=true this fails.")
        return 0

    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        site = args.site
        if site is None:
            site = pathlib.Path(tmp) / "site"
            build_site(site)
        if not (site / "index.html").is_file():
            print(f"ERROR: {site} has no index.html; run mkdocs build first.", file=sys.stderr)
            return 1
        with serve(site.resolve()) as base:
            print(f"serving {site} at {base}")
            failures = run_checks(chromium, base, out, site_pages(site))
    print(f"screenshots: {out}")
    if failures:
        print(f"browser check FAILED ({len(failures)}): " + "; ".join(failures), file=sys.stderr)
        return 1
    print(f"browser check passed in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
