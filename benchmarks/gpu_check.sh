#!/usr/bin/env bash
# The device call: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=540).
# `python -m benchmarks.gpu_check pack` writes .gpu first; the results come back in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
HF_HUB_OFFLINE=1 PYTHONPATH=. PYTHONUNBUFFERED=1 exec python3 -m benchmarks.gpu_check run --carry .gpu --out "${OUT:?the device tool sets OUT}" "$@"
