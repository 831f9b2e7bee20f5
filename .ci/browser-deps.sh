#!/usr/bin/env bash
# Headless Chromium + chromedriver (Debian packages) and selenium for tests/serve/test_browser.py.
# Idempotent: skips what is already there. Runs as root in CI (CI=true); uses sudo otherwise if needed.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "browser-deps: not root and no sudo: cannot apt-get install chromium" >&2; exit 1
  fi
fi

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  echo "browser-deps: $(chromium --version 2>/dev/null | head -1) and chromedriver already installed"
else
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # Debian ships chromium-driver built from the same sources, so browser and driver versions match.
  $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
  echo "browser-deps: installed $(chromium --version 2>/dev/null | head -1)"
fi

# selenium drives the browser; installed into the active Python environment (the CI venv).
PY="${PYTHON:-python}"
if "$PY" -c "import selenium" >/dev/null 2>&1; then
  echo "browser-deps: selenium $("$PY" -c 'import selenium; print(selenium.__version__)') already installed"
else
  "$PY" -m pip install -q "selenium>=4.20"
  echo "browser-deps: installed selenium"
fi
