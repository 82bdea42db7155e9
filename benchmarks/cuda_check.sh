#!/usr/bin/env bash
# The GPU checks, in one go, on a machine with one CUDA GPU and PyTorch installed
# (no network needed). Results land in $OUT (default /tmp/reste-cuda).
#   bash benchmarks/cuda_check.sh                 # every step
#   bash benchmarks/cuda_check.sh tests bench     # only these steps
# Steps: tests, bench (eager), bench_compiled, train
# (main job, bf16 autocast), train_compiled, torchrun (NCCL). Training steps need
# Fashion-MNIST under $RESTE_DATA (or a system folder). Each step is independent
# and time-limited, so one failure does not hide the others.
set -uo pipefail
OUT=${OUT:-/tmp/reste-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
RUNS=$(mktemp -d)
STEPS=${*:-tests bench bench_compiled train train_compiled torchrun}
want() { [[ " $STEPS " == *" $1 "* ]] && echo && echo "=== $1 ($(date +%T))"; }

echo "=== environment"
nvidia-smi -L; $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3

if want tests; then  # the CUDA tests (fused kernels, no device syncs) and every dispatch path
    timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_estimators.py tests/test_nn.py "tests/test_deploy.py::test_loaded_model_on_cuda_matches_trained_model_on_cuda" -s 2>&1 | tee "$OUT/pytest.log" | grep -v "^\s*$" | tail -8
fi
if want bench; then
    timeout 120 $PY benchmarks/bench_train.py --device cuda --models resnet20,vgg_small \
        --modes eager --rounds 5 --steps 10 --out "$OUT/train_cuda_eager.json" 2>&1 | tail -4
fi
if want bench_compiled; then
    timeout 200 $PY benchmarks/bench_train.py --device cuda --models resnet20,vgg_small \
        --modes compiled --rounds 3 --steps 10 --out "$OUT/train_cuda_compiled.json" 2>&1 | tail -4
fi
if want train; then
    timeout 100 $PY -m reste train train.device=cuda train.amp=bf16 train.epochs=2 \
        out.dir="$RUNS" out.name=bf16 2>&1 | tail -5
    cp "$RUNS/bf16/summary.json" "$OUT/bf16_summary.json"
fi
if want train_compiled; then
    timeout 100 $PY -m reste train train.device=cuda train.amp=bf16 train.compile=true train.epochs=1 \
        out.dir="$RUNS" out.name=compiled 2>&1 | tail -5
    cp "$RUNS/compiled/summary.json" "$OUT/compiled_summary.json"
fi
if want torchrun; then
    timeout 60 torchrun --standalone --nproc_per_node=1 -m reste train train.device=cuda \
        train.epochs=1 data.subset=12800 out.dir="$RUNS" out.name=nccl 2>&1 | tail -5
    cp "$RUNS/nccl/summary.json" "$OUT/nccl_summary.json"
fi
echo; echo "=== done ($(date +%T))"
