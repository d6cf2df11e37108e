#!/usr/bin/env bash
# Run the floydd benchmark and write docs/benchmarks.md.
#
#   bash bench/run.sh            # the full run, about 15 minutes
#   bash bench/run.sh --quick    # small sizes to check the harness; writes bench/results/ only
#   bash bench/run.sh --help     # every option
#
# Installs what is missing first: HAProxy and wrk from Debian's packages
# (bookworm ships HAProxy 2.6), py-spy from PyPI into the repository's .venv.
# Needs root (apt-get, ptrace for py-spy), the Docker engine and the
# floydd/flask:latest image. All traffic stays on 127.0.0.1.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

missing=()
command -v haproxy >/dev/null || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
    echo "bench: installing ${missing[*]} from Debian packages"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q -e '.[test]'
fi
if [ ! -x .venv/bin/py-spy ]; then
    .venv/bin/pip install -q py-spy
fi

exec .venv/bin/python -m bench "$@"
