#!/usr/bin/env bash
# One prepared GPU check, run on a CUDA machine from the repo root under the device tool's 600 s limit: the steps'
# own limits add up to 485 s, which leaves the install and the packing room beside them.
# Installs memzoo against the machine's own torch (from .whl/ when carried: tools/gpu_wheels.sh), then runs, most
# needed first: the tests marked `cuda`; the block benchmarks (the 1.3B layer shape, the top-k kernel against
# torch.topk, each block's step against dense); the first quarter of the 4,000-exposure capacity cells of every
# design at once (what sizes a GPU grid); the memory-layer, PEER and host-table benchmarks.
# Results land in ${GPU_CHECK_DIR:-gpu_results}/: one log per step, steps.txt (exit status and seconds of each),
# the benchmarks' JSON, the capacity page and its cells, and the capacity runs' logs. With $OUT set (the device
# tool's folder, which brings back at most 8 files) all of it is packed into $OUT/gpu_check.tar.gz, with steps.txt,
# gpu.txt and the test log beside it.
set -uo pipefail
dir=${GPU_CHECK_DIR:-gpu_results}
mkdir -p "$dir"

pack() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$dir/capacity-runs"
  for run in runs/study-capacity-gpu-*; do  # config, hparams, metrics.csv: a cut cell's steps and their times
    [ -d "$run" ] && cp -r "$run" "$dir/capacity-runs/" 2>/dev/null
  done
  tar czf "$OUT/gpu_check.tar.gz" "$dir"
  cp "$dir/steps.txt" "$dir/gpu.txt" "$dir/pytest_cuda.log" "$OUT/" 2>/dev/null
  return 0
}
trap pack EXIT

# step NAME SECONDS COMMAND...: runs COMMAND for at most SECONDS into $dir/NAME.log; its exit status and seconds go
# to steps.txt (124: cut at its limit), its last lines to the console
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$dir/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start)) limit=$limit" | tee -a "$dir/steps.txt"
  tail -n 25 "$dir/$name.log"
}

# A GPU machine with no network: wheels carried in .whl/ (tools/gpu_wheels.sh makes them) and memzoo from src/.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/memzoo-site .whl/*.whl
  export PYTHONPATH="/tmp/memzoo-site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  python3 -m pip install --quiet --no-deps -e . >/dev/null 2>&1 || python -m pip install --quiet -e ".[dev,hf]"
  python3 -m pip install --quiet pytest lightning torchmetrics "jsonargparse[signatures]" safetensors datasets >/dev/null 2>&1
fi
python3 -c "import memzoo.cli" || { echo "memzoo does not import here: see the error above"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$dir/gpu.txt"

step pytest_cuda 150 python3 -m pytest -q -m cuda tests
step bench_blocks 90 python3 tools/bench_blocks.py --device cuda --repeats 5 --json "$dir/bench_blocks_cuda.json"
# Knowledge capacity at the regime that measures it: the first quarter (9,181 steps) of the 4,000-exposure grid's
# cells, every design at its best CPU rate, seed 1337, all ten at once on the one GPU. The CPU's bits after that
# quarter are each cell's first validation in docs/results/capacity-cpu-x4000.json (dense 18,311, STEM 34,924), so
# the page says whether the GPU's bits agree, and its wall time (or, for a cut run, the steps in capacity-runs/)
# what a whole grid costs here. Resumable; the page's hardware names the GPU.
step capacity 150 python3 tools/capacity.py --cpu --name capacity-gpu-x4000-first-quarter --exposures 4000 \
  --models dense dense-2x moe pkm memoryplus peer ultramem_v2 engram stem mole --lrs 0.01 \
  --model-lrs memoryplus=0.03 peer=0.003 mole=0.03 moe=0.003 --seeds 1337 --jobs 10 --threads 1 \
  --set trainer.max_steps=9181 --out "$dir"
step bench_memory 45 python3 tools/bench_memory.py --sections cuda,layer_step --json "$dir/bench_memory.json"
step bench_peer 25 python3 tools/bench_peer.py --device cuda --json "$dir/bench_peer.json"
# host tables: on-device vs host with prefetch overlap vs host without (JSON + .md)
step bench_host_tables 25 python3 tools/bench_host_tables.py --device cuda --json "$dir/bench_host_tables_cuda.json"
