#!/usr/bin/env bash
# One-GPU check, under 5 minutes: facecli's resnet50 112x112 bf16 training step against the
# naive reference on the same card; prints images/s and the fraction of the card's bf16
# matrix peak the step reaches. Options: see `benchmarks/gpu_check.sh --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi
exec "$py" benchmarks/gpu_check.py "$@"
