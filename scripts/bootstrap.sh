#!/usr/bin/env bash
# Prepare this machine to run floydd and its tests: install the Docker engine,
# mmdebstrap and systemd-analyze, start the engine, create .venv with the
# project and its test dependencies, and build the environment images that
# floydd.toml defines.
# Run it as root on Debian. Each step is skipped when its result exists, so a
# second run takes seconds.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

started=$SECONDS

ensure_system_packages
ensure_docker_engine

# tests/test_systemd.py checks the unit file with systemd-analyze, which
# Debian ships in the systemd package. Installing it does not make systemd
# PID 1. The test that needs a running systemd boots one in a container.
if ! command -v systemd-analyze >/dev/null; then
    [[ $EUID -eq 0 ]] || die "systemd-analyze is missing; run this script as root so it can install the systemd package"
    step "installing systemd with apt-get (for systemd-analyze)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd
fi

venv=.venv
stamp=$venv/.floydd-installed
if [[ ! -x $venv/bin/python ]]; then
    step "creating $venv"
    python3 -m venv "$venv"
fi
if [[ ! -e $stamp || pyproject.toml -nt $stamp ]]; then
    step "installing floydd and its test dependencies into $venv"
    "$venv/bin/pip" install --quiet --editable '.[test]'
    touch "$stamp"
else
    step "$venv is up to date with pyproject.toml"
fi

# floydd env build skips an image that exists with the same build spec.
step "building environment images"
"$venv/bin/floydd" env build --config floydd.toml

step "bootstrap finished in $((SECONDS - started)) s"
