#!/usr/bin/env bash
# One prepared GPU proof of facecli, under 8 minutes on one GPU; writes gpu_check.json
# ($OUT/ when OUT is set, else benchmarks/results/) and prints a table per section.
#   benchmarks/gpu_check.sh                        # the full check (needs CUDA)
#   benchmarks/gpu_check.sh --device cpu --quick   # dry run on the CPU, a minute or two
# On a bare machine (no facecli installed, no internet): the wheels that
# benchmarks/fetch_gpu_wheels.sh put in .whl/ are installed into a private folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi
# Only where facecli's pure-Python needs are missing (a bare machine): an environment that has
# them keeps its own (and .whl/ holds cp312 wheels, which another Python could not install).
if ! "$py" -c "import pydantic_settings, dotenv" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/facecli-gpu-check-site"
    PIP_ROOT_USER_ACTION=ignore "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's facecli, for the check and its child processes
export PYTHONUNBUFFERED=1
exec "$py" benchmarks/gpu_check.py "$@"
