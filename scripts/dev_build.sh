#!/usr/bin/env bash
# Builds the op library in build/dev and drops it into python/fusedrl/ so `PYTHONPATH=python` runs the source
# tree with compiled ops (a faster loop than reinstalling). CUDA kernels are built when nvcc and a CUDA torch exist.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build/dev
# copy, then rename: a process that has the old library loaded keeps a valid file
cp build/dev/_fusedrl_ops.so python/fusedrl/._fusedrl_ops.so.tmp
mv -f python/fusedrl/._fusedrl_ops.so.tmp python/fusedrl/_fusedrl_ops.so
echo "built python/fusedrl/_fusedrl_ops.so"
