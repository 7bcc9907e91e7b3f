#!/usr/bin/env bash
# One single-thread lane of benchmarks/further_pretraining.py: a job a process until none is left
# (start two side by side). Arguments go to `next` (`--only m3e`).
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
while python -m benchmarks.further_pretraining next "$@"; do :; done
