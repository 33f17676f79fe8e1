#!/usr/bin/env bash
# Creates .venv in the repository root with everything the project and its tests need, at the
# exact versions CI tests (requirements/ci.txt).
#
#   bash scripts/setup.sh           CPU; NVIDIA GPUs too when `nvidia-smi` lists one
#   bash scripts/setup.sh --gpu     NVIDIA GPUs: JAX's CUDA 13 plugin, or CUDA 12 for drivers < 580
#   bash scripts/setup.sh --tpu     Cloud TPU VMs: libtpu
#   bash scripts/setup.sh --cpu     CPU only, even on a GPU machine
#   bash scripts/setup.sh --dry-run ...   print the commands instead of running them
#
# PYTHON=/path/to/python3.12 picks the interpreter (default python3). JAX 0.11 and later need
# Python 3.12, which gets JAX 0.12 (what CI tests, .ci/run); under Python 3.11 the pins fall back
# to JAX 0.10.2 / Flax 0.12.8.
set -euo pipefail
cd "$(dirname "$0")/.."

target=auto dry_run=0
for arg in "$@"; do
  case "$arg" in
    --gpu|--tpu|--cpu) target=${arg#--} ;;
    --dry-run) dry_run=1 ;;
    *) echo "error: unknown option $arg; expected --gpu, --tpu, --cpu or --dry-run" >&2; exit 2 ;;
  esac
done

# The CUDA 13 plugin needs an NVIDIA driver >= 580; older drivers (>= 525) run the CUDA 12 one.
cuda_extra() {
  local major
  major=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null \
          | head -n 1 | cut -d. -f1)
  if [[ "$major" =~ ^[0-9]+$ ]] && (( major < 580 )); then echo cuda12; else echo cuda13; fi
}

gpu_listed() { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }

case "$target" in
  auto) if gpu_listed; then extras=",$(cuda_extra)"; else extras=""; fi ;;
  gpu) extras=",$(cuda_extra)" ;;
  tpu) extras=",tpu" ;;
  cpu) extras="" ;;
esac

run() { if (( dry_run )); then echo "$*"; else "$@"; fi; }
if [ ! -x .venv/bin/python ]; then run "${PYTHON:-python3}" -m venv .venv; fi
run .venv/bin/python -m pip install -q --upgrade pip
run .venv/bin/python -m pip install -q -c requirements/ci.txt -e ".[torch,deploy,test$extras]"
