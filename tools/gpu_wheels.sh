#!/usr/bin/env bash
# Run here (a machine that reaches PyPI) before tools/gpu_check.sh goes to a GPU machine that reaches nothing:
# downloads into .whl/ the pure-Python wheels memzoo needs that a stock CUDA/PyTorch image may lack
# (jsonargparse and its signature extras, datasets and its pickling helpers). gpu_check.sh installs them from
# there with --no-index. .whl/ is ignored by git; carry it with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in jsonargparse docstring-parser typeshed-client datasets dill multiprocess; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg"
done
ls .whl
