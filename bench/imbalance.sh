#!/usr/bin/env bash
# Class imbalance on snacks: five classes cut to 15% of their training images (val and test untouched), then
# the default backbone's head trained three ways (no remedy, class_weight balanced, oversample), evaluated on
# the full test split. Usage: bash bench/imbalance.sh SNACKS_DIR OUT_DIR
set -euo pipefail
src=$1; out=$2; cut_classes="cake cookie juice pretzel salad"
mkdir -p "$out"
data="$out/snacks-imbalanced"
if [ ! -d "$data" ]; then
  cp -al "$src" "$data.tmp"   # hard links: ingest reads them as the dataset's own files
  for c in $cut_classes; do
    files=("$data.tmp/train/$c"/*); keep=$(( ${#files[@]} * 15 / 100 ))
    printf '%s\n' "${files[@]}" | sort | tail -n +$((keep + 1)) | xargs rm -f
  done
  mv "$data.tmp" "$data"
fi
common=(--config configs/multisnacks.yaml --data "$data" --set model.image_size=224 --set finetune.epochs=0
        --set evaluate.vision_options=false --set evaluate.tta_flip=false)
for remedy in none class_weight oversample; do
  extra=()
  [ $remedy = class_weight ] && extra=(--set train_head.class_weight=balanced)
  [ $remedy = oversample ] && extra=(--set train_head.oversample=true)
  .venv/bin/python -m pipeline "${common[@]}" "${extra[@]}" --artifacts "$out/$remedy" evaluate
done
.venv/bin/python - "$out" $cut_classes <<'PY'
import json, sys
out, cut = sys.argv[1], sys.argv[2:]
print("| remedy | test top-1 | macro F1 | recall of the cut classes (" + ", ".join(cut) + ") | mean |")
print("|---|---|---|---|---|")
for remedy in ("none", "class_weight", "oversample"):
    m = json.load(open(f"{out}/{remedy}/evaluate/metrics.json"))
    recalls = [m["per_class"][c]["recall"] for c in cut]
    print(f"| {remedy} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | " + ", ".join(f"{r:.2f}" for r in recalls)
          + f" | {sum(recalls) / len(recalls):.3f} |")
PY
