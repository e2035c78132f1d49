#!/usr/bin/env bash
# The dropout sweep of issue 10 on snacks: the default recipe's head (EfficientNet-Lite0, 256 px, cached
# features) with dropout 0, 0.2, 0.4, 0.6, 0.8, chosen on the validation split; the features are computed once.
# Usage: bash bench/sweep_dropout.sh SNACKS_DIR ARTIFACTS_DIR   (writes ARTIFACTS_DIR/sweep/sweep.{csv,png})
set -euo pipefail
time .venv/bin/python -m pipeline --data "$1" --artifacts "$2" sweep --set model.dropout=0,0.2,0.4,0.6,0.8 \
  --until train-head
