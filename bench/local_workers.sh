#!/usr/bin/env bash
# Fine-tuning throughput in one process against 1 and 2 local worker processes (distribute.strategy: multi_worker,
# distribute.local_workers), on the default config's cached activations: images/s of the second epoch, one line each.
# Usage: bench/local_workers.sh DATA ARTIFACTS   (an artifacts folder whose feature store holds the default's
# activations, e.g. one bench/scale_train.sh made; its train-head and finetune folders are replaced; run it alone)
set -euo pipefail
data=$1 artifacts=$2
py=${PYTHON:-.venv/bin/python}
# One view per epoch keeps an epoch near a minute; the second epoch is timed (the first includes tracing). The
# head trains one epoch: its training is not what is timed, and its cached features are reused.
common=(--set finetune.epochs=2 --set finetune.views_per_epoch=1 --set finetune.max_minutes=null
        --set finetune.patience=2 --set train_head.epochs=1)
for mode in none 1 2; do
  if [ "$mode" = none ]; then extra=(--set distribute.strategy=none)
  else extra=(--set distribute.strategy=multi_worker --set distribute.local_workers=$mode); fi
  log=$artifacts/local-workers-$mode.log
  "$py" -m pipeline --data "$data" --artifacts "$artifacts" "${common[@]}" "${extra[@]}" finetune > "$log" 2>&1
  rows=$(sed -n 's/.*training on \([0-9]*\) cached activations.*/\1/p' "$log" | tail -1)
  seconds=$(sed -n 's/.*epoch 2\/2 in \([0-9]*\)s.*/\1/p' "$log" | tail -1)
  images=$((rows / 2))  # the default caches two views of each image (itself, its mirror); an epoch reads one
  echo "$mode: epoch 2 of $images images in ${seconds}s: $(awk "BEGIN {printf \"%.1f\", $images / $seconds}") images/s"
done | tee "$artifacts/local-workers.txt"
