#!/usr/bin/env bash
# Stops the processes deploy/local/up.sh started (their process groups, by the pids it recorded): a pid is
# signalled only while its process has the start time and command line recorded with it, so a pid that is
# someone else's now (after a reboot) is left alone, with a line naming it.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec .venv/bin/python -m actstore.testing.cluster down "${STATE_DIR:-.cluster}"
