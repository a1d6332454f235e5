#!/usr/bin/env bash
# Set up what is missing (setup.sh, with matplotlib for report.png), then the whole pipeline: SFT -> reward model
# -> PPO and DPO -> evaluation into out/ (see pipeline.py).
#   bash pipeline.sh [--device cuda] [--nproc N] [--force] [--dry-run] [--out DIR] [any flag every stage accepts]
set -euo pipefail
bash "$(dirname "$0")/setup.sh" matplotlib
PY=${PYTHON:-$(command -v python3 || command -v python)}
exec "$PY" "$(dirname "$0")/pipeline.py" "$@"
