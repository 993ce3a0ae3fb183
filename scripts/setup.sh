#!/usr/bin/env bash
# Create .venv and install moeconvert with its test tools. Idempotent; safe to rerun.
# torch is pinned to the CPU build first so that the install stays small; on your own machine,
# install the torch build for your platform (e.g. CUDA) before `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e ".[test]"
