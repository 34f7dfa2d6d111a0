#!/usr/bin/env bash
# Tools the test suite needs beyond Python packages (installed by `make test`).
# Each section is idempotent and installs into .tools/ or the virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools
