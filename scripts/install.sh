#!/usr/bin/env bash
# Install what ssmd's tests and demo need, skipping what is already there:
# the Debian server packages (PostgreSQL 15 with wal2json, Redis, NATS with JetStream) and the
# Python package with its test extras. redis-tools brings redis-benchmark, which `ssmd bench`
# uses for the Redis ceiling. Runs as root, or with sudo for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python || echo python3)}"
PACKAGES=(postgresql-15 postgresql-15-wal2json redis-server redis-tools nats-server)

missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done

if ((${#missing[@]})); then
    if [ "$(id -u)" -eq 0 ]; then
        apt_get=(apt-get)
    elif command -v sudo >/dev/null; then
        apt_get=(sudo apt-get)
    else
        echo "install.sh: missing Debian packages ${missing[*]}, and neither root nor sudo is available to install them" >&2
        exit 1
    fi
    echo "install.sh: installing ${missing[*]}"
    "${apt_get[@]}" update -q
    DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -q --no-install-recommends "${missing[@]}"
fi

# Debian marks its system Python as externally managed (PEP 668), and pip rejects installs into
# it. Print how to create a virtual environment instead of pip's longer error.
if "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
    echo "install.sh: $PYTHON is the system's externally managed Python, where pip does not install packages." >&2
    echo "install.sh: create and activate a virtual environment first, then run make again:" >&2
    echo "install.sh:   apt-get install -y python3-venv && python3 -m venv .venv && . .venv/bin/activate" >&2
    exit 1
fi

"$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test]'
