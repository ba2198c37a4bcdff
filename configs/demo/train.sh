#!/usr/bin/env bash
# Trains the demo model as it was trained (docs/demo-model/training.md): five runs, about 33 minutes on one H100 with
# 16 CPU cores, then evaluates it on 55 held-out test streams with each memory part switched off in turn.
# Needs the SmolLM2 cache (`python -c "from vstream.model.smollm2 import load_smollm2; load_smollm2()"`).
# Runs stop at their time limits (time_limit_s), so on other hardware they end at other step counts.
set -euo pipefail
export TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
for step in vision projector finetune finetune-continue round2 round3; do
  start=$(date +%s)
  python -m vstream train --config configs/demo/$step.yaml
  echo "$step: $(( $(date +%s) - start )) s"
done
python -m vstream world-eval --model runs/demo/round3/model --split test --streams 55 --ablate --device cuda \
  --out runs/demo/eval
