#!/usr/bin/env bash
# Portway's test command:  bash scripts/test.sh [pytest arguments...]
#
# Idempotent. On a Debian 12 machine (as root) it first installs whatever the tests need
# and is missing, then runs pytest with the given arguments and exits with pytest's status:
#   - Debian packages: redis-server, wrk, chromium, openssh-server, prometheus, systemd, pebble (Let's Encrypt's
#     test CA), bind9, curl, iproute2, nftables and iptables (only the missing ones;
#     nodejs only when `node` is missing; npm is never installed through apt)
#   - the Python package with its test extras:  pip install -e '.[test]'  (the hot path compiled with mypyc)
#   - the pinned Node test tools (ws, localtunnel) from package-lock.json:  npm ci
# It never starts services; the end-to-end tests start redis, origins, relays... themselves.
# pytest's exit status 5 ("no tests ran") is a failure too.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'test.sh: %s\n' "$*" >&2; }

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

# --- Debian packages -----------------------------------------------------------------------
missing=()
have redis-server || missing+=(redis-server)
have wrk || missing+=(wrk)
have chromium || missing+=(chromium)
have sshd || missing+=(openssh-server)
have promtool || missing+=(prometheus)
have systemd-analyze || missing+=(systemd)
have pebble || missing+=(pebble)
have named || missing+=(bind9)
have curl || missing+=(curl)
have ip || missing+=(iproute2)   # the NAT test-bed (tests/e2e/test_netlab.py, as root): network namespaces
have nft || missing+=(nftables)  # ...and its NAT router
have iptables || missing+=(iptables)  # ...and its impairments where the kernel has no netem
have node || missing+=(nodejs)
have gcc || missing+=(gcc)  # mypyc's C output: the compiled hot path (setup.py; without it, pure Python)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)

if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo)
        else
            log "not root and no sudo: install ${missing[*]} by hand"
            exit 1
        fi
    fi
    # Keep package scripts from starting system services (redis on 6379, sshd on 22, named on 53):
    # the tests run their own instances on free ports.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${SUDO[@]}" chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt_log="$(mktemp)"
    apt_rc=0
    {
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq update &&
            "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y \
                -o Dpkg::Use-Pty=0 "${missing[@]}"
    } >"$apt_log" 2>&1 || apt_rc=$?
    if [ "$made_policy" -eq 1 ]; then
        "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d
    fi
    if [ "$apt_rc" -ne 0 ]; then
        tail -n 60 "$apt_log" >&2
        rm -f "$apt_log"
        log "apt-get failed (exit $apt_rc)"
        exit "$apt_rc"
    fi
    rm -f "$apt_log"
fi

if ! command -v npm >/dev/null 2>&1; then
    log "npm is missing. Install a Node.js (>= 18) that ships npm; this script does not"
    log "apt-install Debian's npm package."
    exit 1
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 18 ]; then
    log "Node.js >= 18 is needed, found $(node --version)"
    exit 1
fi

# --- Python package and test dependencies --------------------------------------------------
# PIP_BREAK_SYSTEM_PACKAGES only matters on a Debian-managed python3 (PEP 668); it is
# ignored by pyenv/venv interpreters.
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --disable-pip-version-check \
    --root-user-action=ignore -e '.[test]'

log "$(python3 -m portway --version)"

# --- Node test tools (exact versions from package-lock.json) -------------------------------
npm ci --include=dev --no-audit --no-fund --loglevel=error

# --- tests ---------------------------------------------------------------------------------
rc=0
python3 -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    log "pytest ran no tests (exit 5): treated as a failure"
fi
# The whole suite ran the compiled hot path; the unit tests run again on the pure-Python modules that every
# machine without a C compiler gets (only when no test paths were given: those name what to run).
only_options=1
for arg in "$@"; do [ "${arg#-}" = "$arg" ] && only_options=0; done
if [ "$rc" -eq 0 ] && [ "$only_options" -eq 1 ] && python3 -c 'import sys; from portway.build_info import compiled_hot_path; sys.exit(not compiled_hot_path())'; then
    log "the unit tests again, on the pure-Python hot path"
    PORTWAY_PURE_PYTHON=1 python3 -m pytest "$@" --ignore=tests/e2e || rc=$?
fi
exit "$rc"
