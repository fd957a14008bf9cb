#!/usr/bin/env bash
# One-command GPU check for the day a CUDA machine is at hand (budget: under 8 minutes on one GPU,
# nothing fetched there). Before sending the tree, on the CPU machine:
#   make setup && scripts/prepare-gpu-wheels.sh      # shared/wheels/ + shared/suite-data/ (< 64 MiB in all)
# Send the tree with shared/ (the suite data is built from the gensim wheel, which the GPU image
# lacks, so it travels built); then on the GPU machine:
#   scripts/gpu-check.sh                  # or: scripts/gpu-check.sh --cpu-dry-run (anywhere, ~3 min)
# Steps: install the carried wheels offline; `pytest -m gpu`; scripts/gpu_check.py (smoke plan over
# every CUDA format with a bf16 baseline, QLoRA few-step training + CUDA max-allocated memory, merge
# paths, divergence KL floor of the bf16 baseline against itself, harness efficiency); one summary.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DRY=""; [ "${1:-}" = "--cpu-dry-run" ] && DRY="--cpu-dry-run"
start=$(date +%s)
status=0
SKIP_BNB=""
if [ -d shared/wheels ] && [ -z "$DRY" ]; then
  # offline: only the carried wheels; what the image has (torch, transformers, peft, ...) stays
  $PY -m pip install -q --no-index --find-links shared/wheels --no-deps shared/wheels/*.whl || status=1
fi
if [ -s shared/wheels/SKIPPED ]; then cat shared/wheels/SKIPPED; fi
$PY -c "import bitsandbytes" 2>/dev/null || SKIP_BNB="--skip-bnb"
export QEVAL_SUITE_DATA="${QEVAL_SUITE_DATA:-$PWD/shared/suite-data}"
[ -f "$QEVAL_SUITE_DATA/MANIFEST.json" ] || { echo "$QEVAL_SUITE_DATA missing: run scripts/prepare-gpu-wheels.sh (after make setup) and send shared/"; exit 2; }

echo "== pytest -m gpu"
if [ -z "$DRY" ]; then
  $PY -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -15
  t=${PIPESTATUS[0]}
else
  echo "(dry run: gpu tests only collected)"
  $PY -m pytest -q -m gpu tests/ --collect-only 2>&1 | tail -3
  t=${PIPESTATUS[0]}
fi
[ "$t" = 0 ] || [ "$t" = 5 ] || status=1
echo "== scripts/gpu_check.py"
# 9 minutes on a GPU; a CPU dry run on a loaded 2-core machine may need longer
timeout "${GPU_CHECK_TIMEOUT:-$([ -n "$DRY" ] && echo 1200 || echo 540)}" $PY scripts/gpu_check.py $DRY $SKIP_BNB || status=1
echo "gpu-check: pytest exit $t, total $(( $(date +%s) - start )) s, status $status"
exit $status
