#!/usr/bin/env bash
# facecli launcher: sets up .venv on first use, then
#   ./run.sh demo            synthetic faces -> train on the CPU -> held-out accuracy, trained vs untrained
#   ./run.sh test [ARGS]     the test suite (pytest ARGS)
#   ./run.sh MODEL [FLAGS]   same as `facecli train MODEL [FLAGS]` (sphereface, cosface, arcface, curricularface, facenet)
#   ./run.sh COMMAND ...     any other facecli command (eval-lfw, resume, embed, ...)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${FACECLI_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    echo "run.sh: creating $VENV" >&2
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.facecli-installed"
  local want
  want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import facecli, torch, torchvision, typer, rich, wandb, pydantic_settings, dotenv, matplotlib, yaml, pytest" 2>/dev/null; then
    echo "run.sh: installing facecli and its dependencies into $VENV (first run: a few minutes)" >&2
    "$PY" -m pip install -qq --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
    # torch first, on its own: the one large wheel, and a machine-level constraint may cap its version.
    if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
      "$PY" -m pip install -qq --disable-pip-version-check "torch>=2.2" "torchvision>=0.17"
    fi
    "$PY" -m pip install -qq --disable-pip-version-check -e ".[test]"
    echo "$want" > "$stamp"
  fi
}

cmd="${1:-help}"
case "$cmd" in
  test)
    shift
    setup
    exec "$PY" -m pytest "$@"
    ;;
  demo)
    shift
    setup
    exec "$VENV/bin/facecli" demo "$@"
    ;;
  sphereface|cosface|arcface|curricularface|facenet)
    setup
    exec "$VENV/bin/facecli" train "$@"
    ;;
  help|-h|--help)
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    setup
    exec "$VENV/bin/facecli" "$@"
    ;;
esac
