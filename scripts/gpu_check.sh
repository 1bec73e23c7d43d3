#!/usr/bin/env bash
# On a GPU machine, in one call: the test suite, the head job, a short end-to-end job
# and a trunk throughput sweep, with a short table last.
#
#   bash scripts/gpu_check.sh PHOTOS WEIGHTS.h5 [OUT]
#
# PHOTOS is a class-folder dataset (a shrunk copy travels well, made by
# scripts/shrink_photos.py), WEIGHTS the VGG16 notop file. QUICK=1 shrinks every
# step, to check the script itself on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
photos=${1:?photos folder}
weights=${2:?VGG16 weights file}
out=${3:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "${QUICK:-0}" = 1 ]; then
  epochs=2; e2e_epochs=1; sizes=8; bench_size=32; width=0.25; seconds=1; size=64
  tests="tests/test_model.py"
else
  epochs=100; e2e_epochs=2; sizes=64,128,256; bench_size=224; width=1.0; seconds=10
  size=224; tests=""
fi

step() { echo "== $1 ($(date +%T))"; }

step "devices"
python -c "import jax; print(jax.devices())"
python -c "import sys, vtl.train, vtl.predict, vtl.convert; \
  print('tensorflow imported' if 'tensorflow' in sys.modules else 'no tensorflow')"

step "tests"
if python -c "import pytest" 2>/dev/null; then
  python -m pytest -q -x $tests 2>&1 | tail -3
else
  echo "pytest is not installed here; tests skipped"
fi

step "head job"
/usr/bin/time -v python -m vtl.train experiments/vgg16_head.py data.root="$photos" \
  model.weights="$weights" train.epochs=$epochs workdir="$out/head" \
  data.image_size=$size features.dir="$out/features" 2> "$out/head.log" | tail -2
grep -E "Maximum resident|test accuracy" "$out/head.log"

step "head job, features reused"
python -m vtl.train experiments/vgg16_head.py data.root="$photos" \
  model.weights="$weights" train.epochs=$epochs workdir="$out/head_warm" \
  data.image_size=$size features.dir="$out/features" 2> "$out/head_warm.log"
grep -E "reused|test accuracy" "$out/head_warm.log"

step "end to end"
python -m vtl.train experiments/vgg16_head.py data.root="$photos" \
  model.weights="$weights" train.mode=end_to_end model.cut=block4_pool \
  train.epochs=$e2e_epochs workdir="$out/e2e" data.image_size=$size \
  features.dir="$out/features" 2> "$out/e2e.log"
grep -E "epoch|test accuracy" "$out/e2e.log"

step "trunk throughput"
for arch in vgg19 vgg16; do
  python scripts/bench_trunk.py --arch $arch --batch-sizes $sizes \
    --dtypes float32,bfloat16 --size $bench_size --width $width --seconds $seconds \
    --peak-tflops 790 | tee "$out/bench_$arch.txt"
done

step "summary"
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("head", "head_warm", "e2e"):
    path = out / name / "summary.json"
    if path.exists():
        s = json.loads(path.read_text())
        accuracy = s["test_accuracy"]
        print(f"{name:10s} test accuracy {accuracy:.4f}  stages {s['stages']}")
for arch in ("vgg19", "vgg16"):
    path = out / f"bench_{arch}.txt"
    if path.exists():
        print(path.read_text().strip())
PY
