#!/usr/bin/env bash
# Set up what is missing (setup.sh), then run the test suite (CPU, a few minutes). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh pytest
PY=${PYTHON:-$(command -v python3 || command -v python)}
set +e
"$PY" -m pytest -q tests "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
