#!/usr/bin/env bash
# The README's demo: synthetic scenes -> 2-rank MPI preprocessing -> Lite-SRL pre-training ->
# few-label evaluation -> CWB profile and plan. Small enough for a 2-core laptop (a few minutes).
# Never reads ../shared: everything is generated here. Outputs under $HPCSRL_DEMO_OUT (demo-out/).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HPCSRL_VENV:-$ROOT/.venv}
export PATH="$VENV/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${HPCSRL_DEMO_OUT:-$ROOT/demo-out}
NP=${NP:-2}
mkdir -p "$OUT"
step() { printf '\n==== %s\n' "$*"; }

step "1/6 synthetic Sentinel-1/-2 scenes (GeoTIFF, UTM)"
hpcsrl synth --out "$OUT/scenes" --scenes 6 --size 480 --size-spread 0.6 --classes 5 --seed 0

step "2/6 MPI preprocessing with $NP ranks -> HDF5 patches"
mpirun --oversubscribe --bind-to none --map-by slot -np "$NP" \
  hpcsrl-preprocess --input "$OUT/scenes" --output "$OUT/patches.h5" --patch-size 48 --max-cloud 0.3 \
  --force  # a re-run of the demo replaces its own earlier file (complete shards are reused)

step "3/6 Lite-SRL self-supervised pre-training (labels hidden)"
rm -rf "$OUT/pretrain"  # a re-run of the demo trains afresh (pretrain refuses to overwrite a run)
hpcsrl pretrain --data "$OUT/patches.h5" --bands s2 --method lite-srl --backbone resnet18 \
  --epochs 2 --batch-size 32 --input-size 32 --out "$OUT/pretrain"

step "4/6 few-label evaluation (frozen encoder, 10 % and 20 % labels) with floors"
hpcsrl evaluate --checkpoint "$OUT/pretrain/checkpoint.pt" --data "$OUT/patches.h5" --bands s2 \
  --mode freeze --label-fractions 0.1,0.2 --epochs 30 --out "$OUT/eval"

step "5/6 CWB per-unit profile"
hpcsrl profile --method lite-srl --backbone resnet18 --bands 12 --input-size 48 --batch-size 16 \
  --optimizer sgd --repeats 3 --out "$OUT/profile.json"

step "6/6 CWB partition plan for 3 devices"
hpcsrl plan --profile "$OUT/profile.json" --devices 3 --memory 150MB --bandwidth 1Gbit/s \
  --objective utilization --out "$OUT/plan.json"

printf '\nDemo finished: outputs in %s\n' "$OUT"
step "what the demo showed"
python "$ROOT/scripts/demo_summary.py" "$OUT"
