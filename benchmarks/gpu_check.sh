#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): bash benchmarks/gpu_check.sh --data-dir .gpu_data/cifar10 [--stages ...]
cd "$(dirname "$0")/.." && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 exec python3 benchmarks/gpu_check.py "$@"
