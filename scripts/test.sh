#!/usr/bin/env bash
# Lint, type-check and run the test suite.   bash scripts/test.sh [pytest args]
# The broker tests need Mosquitto (and the security tests openssl): installed here when missing (apt-get,
# as root); the tests start their own broker on a free 127.0.0.1 port. They never skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${SPLITFT_VENV:-.venv}/bin

# The security tests also need mosquitto_passwd (in the mosquitto package) and the openssl command; the
# dashboard's tests a headless Chromium (Debian's chromium package, or $SPLITFT_CHROMIUM).
have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }
browser() { [ -n "${SPLITFT_CHROMIUM:-}" ] || have chromium || have chromium-browser || have google-chrome; }
if ! have mosquitto || ! have mosquitto_passwd || ! have openssl || ! browser; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing mosquitto, openssl and chromium"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto openssl chromium >/dev/null
    else
        echo "the tests need mosquitto, mosquitto_passwd, openssl and chromium" \
            "(e.g. sudo apt-get install mosquitto openssl chromium)" >&2
        exit 1
    fi
fi

echo "== ruff"
"$PY/ruff" check .
"$PY/ruff" format --check .
echo "== mypy"
# mypy cannot follow setuptools' package-dir mapping: give it the same layout as symlinks.
mkdir -p build/typecheck/splitft
for part in agent coordinator shared bench tools; do ln -sfn "../../../$part" "build/typecheck/splitft/$part"; done
MYPYPATH=build/typecheck "$PY/mypy" -p splitft.shared -p splitft.agent -p splitft.coordinator -p splitft.bench -p splitft.tools
echo "== pytest"
"$PY/python" -m pytest -q "$@"
