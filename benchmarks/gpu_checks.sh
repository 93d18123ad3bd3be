#!/usr/bin/env bash
# The measurements and checks that need a GPU, in parts that each fit a 10-minute call.
#
#   bash benchmarks/gpu_checks.sh PART [OUT_DIR]
#
# PART: goals     the Speed issue's detector goals (Base b16, Large b16, Base b1 latency): fastest exact
#                 path vs target, reference mode and official H100 numbers (goals.py)
#       goals-uni the same goals for WeDetect-Uni proposals
#       tests     the CUDA variants of the tests (fast == reference post-processing, half precision,
#                 overlapped post-processing, Ref)
#       post      post-processing alone, reference vs fast (bench_postprocess.py)
#       detector  Base/Large, batch 1 and 16, fp32 and fp16, reference vs fast (bench_detector.py)
#       uni       the same for WeDetect-Uni proposals
#       accel     Base fp16: overlapped post-processing, channels_last + CUDA graphs, device letterboxing,
#                 and all of them, against the plain path
#       train     training throughput and share of the FLOP bound (bench_train.py)
# With one GPU session's device time (15 minutes, a few of them spent starting the machine), run them in
# this order: goals, tests, goals-uni, accel, detector, uni, post, train.
# Each part writes OUT_DIR/PART.txt (default benchmarks/gpu_results; give $OUT on the device machine)
# and, where the script has one, OUT_DIR/PART.json. Record the tables, with the device name they
# print, in benchmarks/README.md.
set -euo pipefail
part=${1:?usage: gpu_checks.sh goals|goals-uni|tests|post|detector|uni|accel|train [OUT_DIR]}
cd "$(dirname "$0")/.."
out=${2:-benchmarks/gpu_results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
bench() { "$py" "benchmarks/$1" "${@:2}" 2>&1 | tee "$out/$part.txt"; }

case "$part" in
  goals)
    bench goals.py --device cuda --only detector-base-b16 detector-large-b16 detector-base-b1 \
      --json "$out/$part.json" ;;
  goals-uni)
    bench goals.py --device cuda --only uni-base-b16 uni-large-b16 uni-base-b1 --json "$out/$part.json" ;;
  tests)
    "$py" -m pytest -q -p no:cacheprovider tests/test_postprocess.py tests/test_api.py tests/test_accelerate.py tests/ref/test_ref_api.py -k cuda \
      2>&1 | tee "$out/$part.txt" ;;
  post)
    bench bench_postprocess.py --device cuda --iters 10 ;;
  detector)
    bench bench_detector.py --sizes base large --batches 1 16 --dtypes float32 float16 --device cuda \
      --json "$out/$part.json" ;;
  uni)
    bench bench_detector.py --kinds uni --sizes base large --batches 1 16 --dtypes float16 --device cuda \
      --json "$out/$part.json" ;;
  accel)
    bench bench_detector.py --sizes base --batches 1 16 --dtypes float16 --device cuda --accel none \
      overlap channels_last+cudagraphs channels_last+cudagraphs+overlap device_letterbox all \
      --json "$out/$part.json" ;;
  train)
    bench bench_train.py --device cuda --sizes tiny base large --precisions fp32 tf32 bf16 fp16 \
      --json "$out/$part.json" ;;
  *)
    echo "gpu_checks.sh: unknown part '$part' (goals, goals-uni, tests, post, detector, uni, accel, train)" >&2
    exit 2 ;;
esac
