#!/usr/bin/env bash
# The learnable task with a recurring wrong step (docs/results.md, issue 15), resumable: rerun it to continue
# (finished stages are reused). Run it from a worktree of a fixed commit, like scripts/natural_experiment.sh.
# Per seed and noise rate: sft on the noisy answers, the clean ceiling, the oracle that ignores the known wrong
# numbers (the bound on any detector), and with a reference trained on clean generated problems: the ref_loss_wga
# preset, its negatives ignored instead, and the sample filter. Then: python scripts/learnable_table.py runs/learnable/noise-0.4
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1
SEEDS=${SEEDS:-"1 2 3"}
NOISES=${NOISES:-"0.4 0.2"}
for noise in $NOISES; do
  for seed in $SEEDS; do
    echo "=== noise $noise seed $seed $(date -u +%H:%M:%S)"
    /usr/bin/time -f "wall %e s, peak %M KB" python -m tokenforget demo --run_dir "runs/learnable/noise-$noise/seed-$seed" \
      --seed "$seed" --noise "$noise" --settings "[sft, clean, oracle_ignore, ref_loss_wga, ignore, filter]" --report_to "[none]"
  done
done
echo "=== done $(date -u +%H:%M:%S)"
