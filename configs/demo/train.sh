#!/usr/bin/env bash
# Trains the demo model (three stages, ~9 minutes on one H100) and evaluates it on held-out test streams.
# Needs the SmolLM2 cache (`python -c "from vstream.model.smollm2 import load_smollm2; load_smollm2()"`).
set -euo pipefail
export TOKENIZERS_PARALLELISM=false
for stage in vision projector finetune; do
  start=$(date +%s)
  python -m vstream train --config configs/demo/$stage.yaml
  echo "stage $stage: $(( $(date +%s) - start )) s"
done
