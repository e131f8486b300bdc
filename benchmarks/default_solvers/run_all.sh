#!/bin/sh
# The study behind ImplicitAdjoint's default solvers (issue 16): about 10 min CPU, 15 min wall
# on 2 shared cores. study.py caches each problem's dense oracle in results/cache_<problem>.pt;
# drop --fresh to reuse them. Writes analysis.md (the decision tables) next to this file.
set -e
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
D=benchmarks/default_solvers
$PY $D/study.py --fresh > $D/grid_tables.md   # grid + traces, 3 problems (results/*.json, grid.csv)
$PY $D/sensitivity.py > /dev/null             # 12 Adam points of the 1.2k MLP
$PY $D/nonsym.py > /dev/null                  # GMRES restarts on a non-symmetric condition
$PY $D/gmres_sym.py > /dev/null               # MINRES vs long-restart GMRES
$PY $D/analyze.py > $D/analysis.md            # the decision tables
cat $D/analysis.md
