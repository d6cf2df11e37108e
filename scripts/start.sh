#!/usr/bin/env bash
# Start floydd in the background on a Debian machine, as root: bootstrap the
# machine (Docker engine, .venv, environment images), then run
# `floydd serve --config floydd.toml` and wait until GET /healthz returns 200.
#
# The state directory is /var/lib/floydd unless FLOYDD_SERVER_STATE_DIR is set.
# Other FLOYDD_<SECTION>_<KEY> variables override floydd.toml as usual. With
# a state directory of its own, a second floydd (on another FLOYDD_SERVER_PORT)
# keeps its pid file and log in that directory.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

state_dir=${FLOYDD_SERVER_STATE_DIR:-/var/lib/floydd}
# The token commands printed below must reach the same state directory.
floydd_command=.venv/bin/floydd
if [[ $state_dir != /var/lib/floydd ]]; then
    pid_file=$state_dir/floydd.pid
    log_file=$state_dir/floydd.log
    floydd_command="FLOYDD_SERVER_STATE_DIR=$state_dir .venv/bin/floydd"
else
    pid_file=/run/floydd.pid
    log_file=/var/log/floydd.log
fi
health_timeout_s=30

[[ $EUID -eq 0 ]] || die "run this script as root: it writes $pid_file and $log_file"

if [[ -s $pid_file ]]; then
    pid=$(<"$pid_file")
    if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q floydd; then
        echo "floydd is already running (pid $pid); stop it with: kill $pid"
        echo "create an API token with: $floydd_command token create NAME --config floydd.toml"
        exit 0
    fi
    # The pid file of a floydd that has exited, or a reused pid.
    rm -f "$pid_file"
fi

bash scripts/bootstrap.sh

export FLOYDD_SERVER_STATE_DIR=$state_dir
mkdir -p "$state_dir"

# The health check uses loopback when floydd listens on all addresses.
read -r probe_host port base_url < <(
    .venv/bin/python - <<'EOF'
from pathlib import Path

from floydd.config import load_settings

settings = load_settings(Path("floydd.toml"))
host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.server.host, settings.server.host)
print(host, settings.server.port, settings.base_url())
EOF
) || die "cannot read server.host and server.port from floydd.toml"
if [[ $probe_host == *:* ]]; then
    probe_url="http://[$probe_host]:$port"
else
    probe_url="http://$probe_host:$port"
fi

# Without this check, another server on the port could respond to the health
# check below and make a floydd that failed to start look healthy.
if .venv/bin/python -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)' \
    "$probe_host" "$port" 2>/dev/null; then
    die "another process already listens on $probe_url; stop it or set FLOYDD_SERVER_PORT"
fi

step "starting floydd (log: $log_file)"
# setsid puts floydd in its own session so it outlives this shell and its
# terminal. It does not fork here, so $! is floydd's own pid.
setsid nohup .venv/bin/floydd serve --config floydd.toml >>"$log_file" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pid_file"

is_healthy() {
    .venv/bin/python - "$probe_url/healthz" <<'EOF' 2>/dev/null
import sys
import urllib.request

# An empty ProxyHandler keeps http_proxy variables from routing loopback traffic.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=2) as response:
    sys.exit(0 if response.status == 200 else 1)
EOF
}

deadline=$((SECONDS + health_timeout_s))
until kill -0 "$pid" 2>/dev/null && is_healthy; do
    if ! kill -0 "$pid" 2>/dev/null; then
        rm -f "$pid_file"
        tail -n 20 "$log_file" >&2 || true
        die "floydd exited during start-up; see $log_file"
    fi
    if ((SECONDS >= deadline)); then
        kill "$pid" 2>/dev/null || true
        rm -f "$pid_file"
        tail -n 20 "$log_file" >&2 || true
        die "GET $probe_url/healthz did not return 200 within $health_timeout_s s, so floydd was stopped; see $log_file"
    fi
    sleep 0.5
done

# floydd stores only a hash of each token, so every start creates and shows a new admin token.
# The tokens of earlier starts stay valid, since scripts may use them, and the output prints how to revoke them.
token=$(.venv/bin/floydd token create admin --admin --config floydd.toml 2>/dev/null) ||
    die "cannot create an admin token; run: $floydd_command token create admin --admin --config floydd.toml"

echo "floydd is running (pid $pid)"
echo "  URL:   $base_url"
echo "  token: $token (admin, shown once)"
echo "  use:   export FLOYDD_TOKEN=$token"
echo "  older tokens stay valid; list them with: $floydd_command token list --config floydd.toml"
echo "         and revoke one with: $floydd_command token revoke ID --config floydd.toml"
echo "  log:   $log_file"
echo "  state: $state_dir"
echo "  stop:  kill \$(cat $pid_file)"
