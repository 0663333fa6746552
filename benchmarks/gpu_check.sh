#!/usr/bin/env bash
# The GPU checks in one command, for a machine with a CUDA device and torch on it:
#   1. every test marked `cuda` (device placement of the core, the analysis and the optimizer);
#   2. benchmarks/bench_analysis.py on all eight layers of a recorded MNIST step, exact Error 2
#      (target: less than the dense CPU path for layer 5 alone, 272 s in
#      benchmarks/results/bench_analysis_layer5.txt).
# Usage: bash benchmarks/gpu_check.sh [OUTDIR]   (results and logs go into OUTDIR, default ./gpu-check)
# fisherlab needs h5py, hdf5plugin, scipy, matplotlib and tqdm there: install them, or carry their
# wheels and put them on PYTHONPATH first.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -m cuda tests 2>&1 | tee "$out/cuda_tests.txt"
python3 benchmarks/bench_analysis.py --layers all --device cuda --workdir "$out/work" 2>&1 | tee "$out/bench_analysis_cuda.txt"
