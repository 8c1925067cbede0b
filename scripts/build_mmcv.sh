#!/usr/bin/env bash
# Builds and installs mmcv 2.1.0 (CPU ops) into the active Python, for the optional mmdet backend.
# Why a script: `pip install mmcv` fails on torch 2.14 (no pkg_resources in the build env, and torch's
# headers need C++20 while mmcv forces C++17). ~5 min on 2 cores.
# Usage: bash scripts/build_mmcv.sh [WHEEL_DIR]   (WHEEL_DIR keeps the built wheel; default: a temp dir)
set -euo pipefail
out="${1:-$(mktemp -d)}"
work="$(mktemp -d)"
python -m pip install -q "setuptools<81" ninja wheel
python -m pip download -q --no-deps --no-binary=:all: -d "$work" mmcv==2.1.0
tar -xzf "$work"/mmcv-2.1.0.tar.gz -C "$work"
sed -i 's/-std=c++17/-std=c++20/g' "$work/mmcv-2.1.0/setup.py"
(cd "$work/mmcv-2.1.0" && MMCV_WITH_OPS=1 CFLAGS=-g0 python -m pip wheel -q --no-build-isolation --no-deps -w "$out" .)
python -m pip install -q "$out"/mmcv-2.1.0-*.whl
echo "mmcv 2.1.0 installed; wheel kept in $out"
