#!/usr/bin/env bash
# Stops the processes deploy/local/up.sh started (their process groups, by the pids it recorded).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec .venv/bin/python -m actstore.testing.cluster down "${STATE_DIR:-.cluster}"
