#!/usr/bin/env bash
# The natural-noise measurement (docs/results.md, issue 15), resumable: rerun it to continue (finished stages are
# reused). Run it from a worktree of a fixed commit so that code changes never disturb it:
#   git worktree add --detach ../tf-exp HEAD && cd ../tf-exp && bash scripts/natural_experiment.sh > natural.log 2>&1 &
# Phase 1, per seed: sft on the gold solutions (the ceiling: train, then eval), then sft, dft and the oracle
# (the wrong solutions ignored: a perfect verifier) on the noisy set. Phase 2, per seed: the detectors (a trusted
# reference; the sample filter, the paper's forgetting, the recommended preset) and the oracle that forgets.
# The bounds come first because they say whether any detector can win at all.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1
CFG=configs/gsm8k-natural-smollm2.yaml
ORACLE='{"oracle_ignore": {"objective": {"mode": "ignore"}, "partition": {"selection": "oracle"}}}'
[ -f data/gsm8k-natural/manifest.json ] || python -m tokenforget prepare --out_dir data/gsm8k-natural \
  --solution_source 175b_random --n_questions 64 --trusted_size 64 --val_size 32 --test_size 64
for seed in 1 2 3; do
  GOLD="--data.path data/gsm8k-natural/gold.jsonl --run_dir runs/gsm8k-natural-gold/seed-$seed --seed $seed --report_to [none]"
  echo "=== gold seed $seed $(date -u +%H:%M:%S)"
  /usr/bin/time -f "wall %e s, peak %M KB" python -m tokenforget train $CFG $GOLD --train.objective.mode sft
  /usr/bin/time -f "wall %e s, peak %M KB" python -m tokenforget eval $CFG $GOLD --eval.checkpoint sft
  echo "=== bounds, seeds up to $seed $(date -u +%H:%M:%S)"
  seeds=$(python -c "print(list(range(1, $seed + 1)))" | tr -d ' ')
  /usr/bin/time -f "wall %e s, peak %M KB" python -m tokenforget compare $CFG --compare.seeds "$seeds" \
    --compare.variants "$ORACLE" --run_dir runs/gsm8k-natural --report_to '[none]'
done
for seed in 1 2 3; do
  echo "=== detectors, seeds up to $seed $(date -u +%H:%M:%S)"
  seeds=$(python -c "print(list(range(1, $seed + 1)))" | tr -d ' ')
  /usr/bin/time -f "wall %e s, peak %M KB" python -m tokenforget compare $CFG --compare.seeds "$seeds" --report_to '[none]'
  /usr/bin/time -f "wall %e s, peak %M KB" python -m tokenforget audit $CFG --run_dir runs/gsm8k-natural/seed-$seed --seed $seed
done
echo "=== done $(date -u +%H:%M:%S)"
python scripts/bounds_table.py runs/gsm8k-natural --ceiling gold=runs/gsm8k-natural-gold
