#!/usr/bin/env bash
# Install what ssmd's tests and demo need, skipping what is already there:
# the Debian server packages (PostgreSQL 15 with wal2json, Redis, NATS with JetStream) and the
# Python package with its test extras. redis-tools brings redis-benchmark, which `ssmd bench`
# uses for the Redis ceiling. Runs as root, or with sudo for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
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

"$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test]'
