#!/usr/bin/env bash
# Install floydd from this checkout as a system service, as root:
#   /opt/floydd/venv                     virtual environment with floydd
#   /usr/local/bin/floydd                link to the floydd command
#   /etc/floydd/floydd.toml              configuration, kept when present
#   /etc/systemd/system/floydd.service   unit file, replaced on each run
#   /var/lib/floydd                      state directory
# Run it again after updating the checkout to upgrade floydd.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

prefix=/opt/floydd
venv=$prefix/venv
config=/etc/floydd/floydd.toml
unit=/etc/systemd/system/floydd.service
state_dir=/var/lib/floydd
command_link=/usr/local/bin/floydd

[[ $EUID -eq 0 ]] || die "run this script as root: it writes to $prefix, /etc and /var/lib"

ensure_system_packages

if [[ ! -x $venv/bin/python ]]; then
    step "creating $venv"
    python3 -m venv "$venv"
fi
# The build runs in a copy so that setuptools' build/ directory stays out of
# the checkout, where files left by an earlier build could reach the next one.
build_dir=$(mktemp -d)
trap 'rm -rf "$build_dir"' EXIT
cp -r pyproject.toml floydd "$build_dir"/
if [[ -e README.md ]]; then
    cp README.md "$build_dir"/
fi
# pip reinstalls a project given as a local directory even when the version
# is unchanged, so this also upgrades an existing installation.
step "installing floydd into $venv"
"$venv/bin/pip" install --quiet "$build_dir"

if [[ -e $command_link && ! -L $command_link ]]; then
    step "keeping $command_link, which is not a link; use $venv/bin/floydd"
else
    ln -sfn "$venv/bin/floydd" "$command_link"
fi

if [[ -e $config ]]; then
    step "keeping the existing $config"
else
    step "installing $config"
    install -D -m 0644 floydd.toml "$config"
fi

step "installing $unit"
install -D -m 0644 systemd/floydd.service "$unit"
install -d -m 0750 "$state_dir"

if pid1_is_systemd; then
    systemctl daemon-reload
    if systemctl is-active --quiet floydd; then
        # Job containers keep running across the restart and are adopted again.
        start_hint="systemctl restart floydd   (the running floydd is the previous version)"
    else
        start_hint="systemctl enable --now floydd"
    fi
else
    step "PID 1 is not systemd, so the unit is installed but cannot be started here"
    start_hint="$venv/bin/floydd serve --config $config"
fi

cat <<EOF

floydd $("$venv/bin/floydd" --version | cut -d' ' -f2) is installed. Next steps:
  1. Review $config.
  2. Build the environment images (this downloads Debian packages and can take minutes):
       floydd env build --config $config
  3. Start floydd:
       $start_hint
EOF
