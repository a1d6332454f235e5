#!/usr/bin/env bash
# Install what minirlhf needs and is missing; silent when everything is there. Used by pipeline.sh, test.sh, .ci/run.
#   bash setup.sh [more packages to make sure of: pytest, matplotlib, or import-name:pip-name]
# torch: on a machine without an NVIDIA GPU only a CPU build is installed, never a multi-GB CUDA one (if the
# default index would pick a CUDA wheel, the PyTorch CPU index is used instead).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$(command -v python3 || command -v python || true)}
if [ -z "$PY" ] || ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "setup: minirlhf needs Python 3.10 or newer (set PYTHON=/path/to/python)" >&2
  exit 1
fi
# pip's progress and "Location ... is ignored" notes are noise here; its errors still show
pip_install() { local rc=0
                "$PY" -m pip install --quiet --quiet "$@" 2> >(grep -v "^WARNING: Location" >&2) || rc=$?
                return "$rc"; }
CPU_INDEX=https://download.pytorch.org/whl/cpu

# which import names are missing (find_spec: no slow import of torch when everything is there)
missing_mods() { "$PY" -c 'import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@"; }

if [ -n "$(missing_mods torch)" ]; then
  echo "setup: installing torch" >&2
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install torch
  else
    # what would the default index install? (pip >= 22.2; an older pip reports nothing: the plain route)
    report=$("$PY" -m pip install --dry-run --ignore-installed --quiet --report - torch==2.13.0 2>/dev/null || true)
    if grep -Eq '"name": *"nvidia-|\+cu[0-9]' <<<"$report"; then
      pip_install torch --index-url "$CPU_INDEX"          # the default index would bring a CUDA build
    else
      pip_install torch==2.13.0 || pip_install torch --index-url "$CPU_INDEX"
    fi
  fi
fi

# the rest: import name -> pip name (only the missing ones are installed)
pairs=(numpy:numpy tokenizers:tokenizers tqdm:tqdm "$@")
gone=" $(missing_mods "${pairs[@]%%:*}") "
missing=()
for pair in "${pairs[@]}"; do
  case "$gone" in *" ${pair%%:*} "*) missing+=("${pair#*:}") ;; esac
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  pip_install -r requirements.txt "${missing[@]}"
fi
