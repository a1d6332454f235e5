#!/usr/bin/env bash
# The whole pipeline: SFT -> reward model -> PPO and DPO -> evaluation into out/ (see pipeline.py).
#   bash pipeline.sh [--device cuda] [--force] [--dry-run] [--out DIR] [any flag every stage accepts]
set -euo pipefail
exec python "$(dirname "$0")/pipeline.py" "$@"
