#!/usr/bin/env bash
# The GPU check (issue 16, item 5): on a bare CUDA machine without network, in under 8 minutes,
#   1. install from wheels/ what the image lacks (made beforehand by scripts/gpu_wheels.sh, carried along),
#   2. run the CUDA-marked tests (exact per-token CE in fp32 on 12 architectures, bf16 smoke, the fused
#      kernels against F.cross_entropy, a whole `tokenforget run` on a tiny model),
#   3. time a forget step against a plain SFT step on a random Llama-3.2-1B-shaped model in bf16
#      (benchmarks/gpu.py: tokens/s, MFU, ratio; target <= 1.03), written as JSON for docs/performance.md.
#
#     bash scripts/gpu_wheels.sh            # here, with PyPI: fills wheels/ (~18 MiB)
#     bash scripts/gpu_check.sh [OUT_DIR]   # there, from the repository root; OUT_DIR defaults to $OUT or /tmp/tf-gpu
#
# Each step has its own time limit (the sum stays under 8 minutes); the script stops at the first failure
# and its logs are in OUT_DIR (install.log, tests.log, bench.log, gpu_bench.json).
set -uo pipefail
out="${1:-${OUT:-/tmp/tf-gpu}}"
mkdir -p "$out"
py=python3
site=/tmp/tf-site
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
start=$SECONDS

step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, log, stop the check on failure
  local name=$1 limit=$2 log=$3; shift 3
  echo "== $name (limit ${limit} s, at $((SECONDS - start)) s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "== $name FAILED (exit $rc; 124 = over its time limit); log: $out/$log"; exit "$rc"; fi
}

nvidia-smi -L || { echo "no NVIDIA GPU visible"; exit 1; }
if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1; then
  # by name, so pip picks the wheel of this python (multiprocess has one per python version)
  names=$(ls wheels/*.whl | xargs -n1 basename | cut -d- -f1 | sort -u)
  step install 120 install.log $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" --find-links wheels $names
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels/ (bash scripts/gpu_wheels.sh makes it): using what is installed"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
step versions 60 versions.log $py -c "
import torch, transformers, peft, accelerate, datasets, jsonargparse, pyarrow
from tokenforget.model.head_ce import fused_backend
assert torch.cuda.is_available(), 'torch sees no CUDA GPU'
print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__,
      '| peft', peft.__version__, '| accelerate', accelerate.__version__, '| datasets', datasets.__version__,
      '| pyarrow', pyarrow.__version__)
print('GPU', torch.cuda.get_device_name(0), '| bf16', torch.cuda.is_bf16_supported(),
      '| fused CE backend', fused_backend(torch.device('cuda')))"
step tests 240 tests.log $py -m pytest -m cuda -rs -p no:cacheprovider \
  tests/test_exact_ce.py tests/test_fused_ce.py tests/test_cuda_run.py
step bench 150 bench.log $py benchmarks/gpu.py --json "$out/gpu_bench.json"
echo "== GPU check passed in $((SECONDS - start)) s; figures in $out/gpu_bench.json (for docs/performance.md)"
