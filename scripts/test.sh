#!/usr/bin/env bash
# Run the checks CI runs: bootstrap, ruff, mypy, then pytest with the given
# arguments (for example `scripts/test.sh -m "not docker"` or `-k envbuild`).
# FLOYDD_TEST_TIMEOUT_S bounds the pytest run, 1200 s by default.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

bash scripts/bootstrap.sh

step "ruff check and ruff format --check"
.venv/bin/ruff check floydd tests bench
.venv/bin/ruff format --check floydd tests bench

step "mypy"
.venv/bin/mypy

# A hung test (or a thread that keeps the interpreter alive after the last
# test) fails the run after this many seconds instead of blocking CI.
pytest_timeout_s=${FLOYDD_TEST_TIMEOUT_S:-1200}

step "pytest -ra $*"
status=0
# --foreground keeps pytest in the terminal's process group, so Ctrl-C works.
timeout --foreground --kill-after=30 "$pytest_timeout_s" .venv/bin/python -m pytest -ra "$@" || status=$?
if ((status == 5)); then
    # pytest exits 5 when it collected nothing, which would otherwise pass CI
    # silently after a wrong path or marker expression.
    die "pytest collected no tests; check the arguments: $*"
fi
if ((status == 124 || status == 137)); then
    die "pytest did not exit within $pytest_timeout_s s (set FLOYDD_TEST_TIMEOUT_S to change the limit)"
fi
exit "$status"
