#!/usr/bin/env bash
# Install everything the tests need into .venv, then run the gates and the whole suite:
# ruff, mypy (strict on src/), pytest with coverage.  Exit status is non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_env.sh
source scripts/_env.sh
# shellcheck source=scripts/system-deps.sh
source scripts/system-deps.sh
ensure_system_deps
ensure_venv dev
echo "== ruff"
"$VENV/bin/ruff" check src tests benchmarks
echo "== mypy (strict, src/)"
"$VENV/bin/mypy"
echo "== pytest"
"$VENV/bin/python" -m pytest --cov --cov-report=term "$@"
