#!/usr/bin/env bash
# One prepared GPU check (run on a CUDA machine from the repo root, in under 8 minutes):
# installs memzoo against the machine's own torch (from .whl/ when carried: tools/gpu_wheels.sh), runs the tests marked `cuda`, then the GPU benchmarks.
# Results land in ${OUT:-gpu_results}/ (pytest log, bench JSON).
set -uo pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
# A GPU machine with no network: wheels carried in .whl/ (tools/gpu_wheels.sh makes them) and memzoo from src/.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/memzoo-site .whl/*.whl
  export PYTHONPATH="/tmp/memzoo-site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  python3 -m pip install --quiet --no-deps -e . >/dev/null 2>&1 || python -m pip install --quiet -e ".[dev,hf]"
  python3 -m pip install --quiet pytest lightning torchmetrics "jsonargparse[signatures]" safetensors datasets >/dev/null 2>&1
fi
python3 -c "import memzoo.cli" || { echo "memzoo does not import here: see the error above"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout 150 python3 -m pytest -q -m cuda tests 2>&1 | tail -25 | tee "$out/pytest_cuda.txt"
timeout 90 python3 tools/bench_memory.py --sections cuda,layer_step --json "$out/bench_memory.json" 2>&1 | tail -30
timeout 60 python3 tools/bench_peer.py --device cuda --json "$out/bench_peer.json" 2>&1 | tail -15
timeout 90 python3 tools/bench_blocks.py --device cuda --repeats 5 --json "$out/bench_blocks_cuda.json" 2>&1 | tail -25
# host tables: on-device vs host with prefetch overlap vs host without (JSON + .md)
timeout 90 python3 tools/bench_host_tables.py --device cuda --json "$out/bench_host_tables_cuda.json" 2>&1 | tail -6
# knowledge capacity at the regime that measures it, on the GPU: the first quarter of the 4,000-exposure grid's dense
# and STEM cells (9,181 steps; on the CPU 18,311 and 30,318 bits, docs/results/capacity-cpu-x4000-first-quarter.md):
# the GPU's time per cell there, what sizes a GPU grid, and whether its bits agree with the CPU's. Resumable; the
# page (hardware: the GPU by name) lands in $out/capacity-gpu-x4000-first-quarter.{json,md,png}
timeout 120 python3 tools/capacity.py --cpu --name capacity-gpu-x4000-first-quarter --exposures 4000 --models dense stem \
  --model-lrs stem=0.03 --seeds 1337 --jobs 2 --threads 1 --set trainer.max_steps=9181 --out "$out" 2>&1 \
  | grep -a "^\[capacity\]\|^\[study\]\|^met\|^MISSED\|^| " | tail -20
