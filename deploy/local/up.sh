#!/usr/bin/env bash
# Two Ray nodes and an S3 endpoint (moto) on 127.0.0.1, for development. Prints what to export:
#   eval "$(deploy/local/up.sh)"      # then: actstore extract --out s3://actstore/... (same commands as a cluster)
#   deploy/local/down.sh              # stops exactly what up.sh started (by pid)
# STATE_DIR (default .cluster) holds the pids (with each process's start time and command line), the Ray auth
# token and the logs.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec .venv/bin/python -m actstore.testing.cluster up "${STATE_DIR:-.cluster}"
