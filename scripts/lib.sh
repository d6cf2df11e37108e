# Helpers shared by the scripts in this directory. Source it, do not run it.
# shellcheck shell=bash

step() {
    printf '==> %s\n' "$*"
}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

pid1_is_systemd() {
    [[ "$(cat /proc/1/comm 2>/dev/null)" == systemd ]]
}

# Install the missing ones among the Debian packages floydd needs on the host.
# These are the Docker engine and CLI, mmdebstrap to build environment images,
# and python3 with venv to create virtual environments.
ensure_system_packages() {
    local -a packages=()
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
        packages+=(docker.io)
    fi
    if ! command -v mmdebstrap >/dev/null; then
        packages+=(mmdebstrap)
    fi
    if ! command -v python3 >/dev/null; then
        packages+=(python3 python3-venv)
    elif ! python3 -c 'import ensurepip' 2>/dev/null; then
        # Debian ships ensurepip, which `python3 -m venv` needs, in python3-venv.
        packages+=(python3-venv)
    fi
    if ((${#packages[@]} == 0)); then
        return 0
    fi

    [[ $EUID -eq 0 ]] || die "missing ${packages[*]}; run this script as root so it can install them"
    step "installing ${packages[*]} with apt-get"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"
}

# Start the Docker engine unless `docker info` already reaches one, then wait
# up to 60 s for it to accept requests.
ensure_docker_engine() {
    if docker info >/dev/null 2>&1; then
        return 0
    fi

    [[ $EUID -eq 0 ]] || die "the Docker engine is not running; run this script as root so it can start it"
    local log=/var/log/floydd-dockerd.log
    local dockerd_pid=""
    local hint
    if pid1_is_systemd; then
        step "starting docker.service"
        systemctl start docker.service
        hint="journalctl -u docker.service"
    else
        # Without systemd nothing supervises dockerd, so it runs in its own
        # session to outlive this script and its terminal.
        step "starting dockerd (log: $log)"
        setsid dockerd >>"$log" 2>&1 </dev/null &
        dockerd_pid=$!
        hint=$log
    fi

    local deadline=$((SECONDS + 60))
    until docker info >/dev/null 2>&1; do
        if [[ -n $dockerd_pid ]] && ! kill -0 "$dockerd_pid" 2>/dev/null; then
            tail -n 20 "$log" >&2 || true
            die "dockerd exited during start-up; see $log"
        fi
        if ((SECONDS >= deadline)); then
            die "the Docker engine did not respond within 60 s; see $hint"
        fi
        sleep 1
    done
    step "Docker engine is running"
}
