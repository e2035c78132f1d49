#!/usr/bin/env bash
# The default config through finetune with the training set at 1x, 2x and 4x (bench/double_train.py makes the
# larger copies): wall time, peak resident memory and each stage's duration, one line per factor.
# Usage: bench/scale_train.sh SNACKS_DIR OUT_DIR [FACTOR ...]   (factors default to 1 2 4; run it alone)
set -euo pipefail
src=$1 out=$2
shift 2
factors=${*:-1 2 4}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
for factor in $factors; do
  data=$src
  if [ "$factor" != 1 ]; then
    data=$out/data-x$factor
    [ -d "$data" ] || "$py" bench/double_train.py "$src" "$data" "$factor"
  fi
  /usr/bin/time -v -o "$out/x$factor.time" "$py" -m pipeline --data "$data" --artifacts "$out/artifacts-x$factor" \
    finetune > "$out/x$factor.log" 2>&1
  "$py" - "$out" "$factor" <<'PY'
import json, re, sys
from pathlib import Path
out, factor = Path(sys.argv[1]), sys.argv[2]
timing = (out / f"x{factor}.time").read_text()
wall = re.search(r"Elapsed \(wall clock\) time.*: (.*)", timing).group(1)
peak_gb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing).group(1)) / 1e6
stages = {}
for stage in ("ingest", "augment", "train-head", "finetune"):
    manifest = json.loads((out / f"artifacts-x{factor}" / stage / "manifest.json").read_text())
    stages[stage] = round(manifest["duration_s"] / 60, 2)
training = json.loads((out / f"artifacts-x{factor}" / "finetune" / "training.json").read_text())
epochs = training["epochs_run"]
print(f"x{factor}: wall {wall}, peak {peak_gb:.2f} GB, minutes per stage {stages}, finetune epochs {epochs}, "
      f"best {training['best_epoch']}, val {training['val_accuracy']:.3f}")
PY
done | tee -a "$out/summary.txt"
