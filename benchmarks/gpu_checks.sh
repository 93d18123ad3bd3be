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
#       parity    the detector / Uni oracle suite with the models on CUDA in float32 (TF32 off), both
#                 post-processing modes: the Speed issue's "the fp32 fast path passes every parity fixture"
#       post      post-processing alone, reference vs fast (bench_postprocess.py)
#       detector  Base/Large, batch 1 and 16, fp32 and fp16, reference vs fast (bench_detector.py)
#       uni       the same for WeDetect-Uni proposals
#       accel     Base fp16: overlapped post-processing, channels_last + CUDA graphs, device letterboxing,
#                 and all of them, against the plain path
#       train     training throughput and share of the FLOP bound (bench_train.py)
# With one GPU session's device time (15 minutes, a few of them spent starting the machine), run them in
# this order: goals, tests, parity, goals-uni, accel, detector, uni, post, train.
# Each part writes OUT_DIR/PART.txt (default benchmarks/gpu_results; give $OUT on the device machine)
# and, where the script has one, OUT_DIR/PART.json. Record the tables, with the device name they
# print, in benchmarks/README.md.
#
# The device image has PyTorch, transformers, OpenCV, typer and tqdm but not pydantic, which the `train`
# part needs (training configs), and so does the CLI with typer >= 0.29 (it parses options with pydantic).
# Before a run that needs it, fetch the wheels here with
#   bash benchmarks/gpu_checks.sh wheels
# and carry `.whl` (git-ignored): this script installs whatever `.whl/*.whl` holds into /tmp/site first.
set -euo pipefail
part=${1:?usage: gpu_checks.sh goals|goals-uni|tests|parity|post|detector|uni|accel|train|wheels [OUT_DIR]}
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ "$part" = wheels ]; then  # on the development machine: the device image's Python is 3.12
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  ls .whl
  exit 0
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
out=${2:-benchmarks/gpu_results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
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
  parity)
    WEDETECT_TEST_DEVICE=cuda "$py" -m pytest -q -p no:cacheprovider tests/test_parity_detector.py \
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
    echo "gpu_checks.sh: unknown part '$part' (goals, goals-uni, tests, parity, post, detector, uni, accel, train, wheels)" >&2
    exit 2 ;;
esac
