#!/usr/bin/env bash
# Download the wheels that scripts/gpu_check.sh installs on a GPU machine without network, into wheels/
# (gitignored; carried with the checkout, < 64 MiB). Run here, where PyPI is reachable:
#
#     bash scripts/gpu_wheels.sh [DEST]        # DEST defaults to wheels/
#
# A bare GPU image typically has torch, transformers, peft, accelerate, numpy, pandas, pyarrow, xxhash, pyyaml,
# pytest and matplotlib, and lacks what the check imports beside them: datasets (with dill and multiprocess),
# jsonargparse (with docstring-parser and typeshed-client), trl. transformers and peft come too, at the
# versions CI tests (the post-head transforms in model_ce.KNOWN_LOGIT_MAPS were read from transformers 5.24).
# Not carried, because the check does not import them: lm_eval (evaluation), gguf (GGUF loading).
# Optional fused CE kernels (tokenforget.model.head_ce): liger-kernel, and cut-cross-entropy if PyPI has a wheel.
# Versions are the ones pinned below, for CPython 3.11 and 3.12 (the GPU image's python3 was 3.12.3) where
# a wheel is version-specific, otherwise py3-none-any.
set -euo pipefail
dest="${1:-wheels}"
mkdir -p "$dest"
PINNED=(
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 importlib-resources==6.5.2
  trl==1.16.0 transformers==5.24.0 peft==0.21.2
  liger-kernel==0.8.5
)
for py in 3.11 3.12; do
  python3 -m pip download -q --no-deps --only-binary=:all: --dest "$dest" \
    --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any "${PINNED[@]}"
done
# cut-cross-entropy: optional, and only if a wheel exists (no network on the GPU machine to build an sdist)
python3 -m pip download -q --no-deps --only-binary=:all: --dest "$dest" cut-cross-entropy==25.1.1 \
  || echo "cut-cross-entropy: no wheel; the check uses Liger or the chunked head"
ls -1 "$dest"
du -sh "$dest"
size=$(du -sm "$dest" | cut -f1)
if [ "$size" -ge 64 ]; then echo "wheels: ${size} MiB, over the 64 MiB a GPU run can carry" >&2; exit 1; fi
