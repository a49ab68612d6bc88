#!/usr/bin/env bash
# Builds the op library in build/dev and drops it into python/fusedrl/ so `PYTHONPATH=python` runs the source
# tree with compiled ops (a faster loop than reinstalling). CUDA kernels are built when a CUDA torch and a usable
# CUDA toolkit exist (cmake/CudaSupport.cmake says why not). --fresh: a failed configure leaves no stale cache.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
cmake --fresh -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >"$log" 2>&1 || { cat "$log"; exit 1; }
grep -- "-- fusedrl:" "$log" || true
cmake --build build/dev
# copy, then rename: a process that has the old library loaded keeps a valid file
cp build/dev/_fusedrl_ops.so python/fusedrl/._fusedrl_ops.so.tmp
mv -f python/fusedrl/._fusedrl_ops.so.tmp python/fusedrl/_fusedrl_ops.so
echo "built python/fusedrl/_fusedrl_ops.so"
