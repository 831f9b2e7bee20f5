#!/usr/bin/env bash
# Java for pycocoevalcap's PTB tokenizer and METEOR (captioning metrics): Debian's default-jre-headless.
# Idempotent: skips when a java is already on PATH. Runs as root in CI; uses sudo otherwise.
set -euo pipefail
if command -v java >/dev/null 2>&1; then
  echo "java-deps: $(java -version 2>&1 | head -1) already installed"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "java-deps: not root and no sudo: cannot apt-get install default-jre-headless" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends default-jre-headless >/dev/null
echo "java-deps: installed $(java -version 2>&1 | head -1)"
