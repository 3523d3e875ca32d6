#!/usr/bin/env bash
# The GPU measurement in one command, for a machine with CUDA torch but no registry access:
#
#   here:   pip download --no-deps -d wheels diffusers pluggy attrs typer rich click shellingham
#   there:  bash benchmarks/gpu.sh [OUT.json]
#
# Installs the carried wheels and this project without dependencies (torch, transformers, peft and
# accelerate come with the machine), then times the full default GoodDrag edit (LoRA trained,
# 210 steps, 512 px, SD1.5 architecture) and the DragDiffusion preset against the faithful path,
# with peak GPU memory, in one process per variant. Writes OUT.json (default gpu-speed.json).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d wheels ]; then
    python -m pip install --no-deps --no-index --find-links wheels wheels/*.whl
fi
python -m pip install --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python benchmarks/speed.py --device cuda --presets gooddrag,dragdiffusion \
    --variants faithful,default,default-fp32,low-memory,default-compile --out "${1:-gpu-speed.json}"
# what the same code asks of the backend (dispatches, host syncs, graph breaks of the captured steps),
# counted on this machine too (deterministic; `default-compile` above is the captured step in CUDA graphs)
python benchmarks/counts.py --skip-sd15 --out "${1:-gpu-speed.json}.counts.json"
