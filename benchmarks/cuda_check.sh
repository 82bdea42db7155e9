#!/usr/bin/env bash
# The GPU checks, in one go, on a machine with one CUDA GPU and PyTorch installed
# (no network needed). Results land in $OUT (default /tmp/reste-cuda).
#   bash benchmarks/cuda_check.sh                 # every step
#   bash benchmarks/cuda_check.sh tests bench     # only these steps
#   bash benchmarks/cuda_check.sh issue17         # issue 17's targets only (at most 14 minutes)
#   bash benchmarks/cuda_check.sh smoke           # on a CPU: the benchmark's code paths run (no numbers)
# Steps: tests, triton (the Triton kernels on the GPU against the PyTorch formulas),
# issue17 (every measurement issue 17's targets need, one JSON in benchmarks/results/), smoke (CPU),
# bench (eager), bench_compiled, train (main job, bf16 autocast), train_compiled,
# train_auto (train.compile's default), torchrun (NCCL). Training steps need
# Fashion-MNIST under $RESTE_DATA (or a system folder). Each step is independent
# and time-limited, so one failure does not hide the others.
set -uo pipefail
OUT=${OUT:-/tmp/reste-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
RUNS=$(mktemp -d)
STEPS=${*:-tests triton issue17 train train_auto torchrun}
RESULTS=benchmarks/results
GPU_TAG=$($PY -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())" 2>/dev/null || echo gpu)
want() { [[ " $STEPS " == *" $1 "* ]] && echo && echo "=== $1 ($(date +%T))"; }

echo "=== environment"
nvidia-smi -L || echo "no nvidia-smi: only the smoke step can run"
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
$PY -c "import triton; print('triton', triton.__version__)" || echo "triton missing: the Triton steps measure the PyTorch formulas only"
[[ -n ${NO_INSTALL:-} ]] || $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3  # NO_INSTALL=1: as installed

if want tests; then  # the CUDA tests (fused kernels, no device syncs) and every dispatch path
    timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_estimators.py tests/test_nn.py "tests/test_deploy.py::test_loaded_model_on_cuda_matches_trained_model_on_cuda" -s 2>&1 | tee "$OUT/pytest.log" | grep -v "^\s*$" | tail -8
fi
if want triton; then  # the fused kernels compiled for this GPU, against the PyTorch formulas on the same GPU
    timeout 240 $PY - <<'PYEOF' 2>&1 | tee "$OUT/triton_check.log" | tail -20
import json, math, torch, reste
from reste import ops
assert ops.kernel_info("cuda")["path"] == "triton", ops.kernel_info("cuda")
dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
z = torch.randn(2_000_003, device=dev, generator=g) * 1.5
z[:9] = torch.tensor([0.0, -0.0, 0.1, -0.1, 1.5, -1.5, 1.0, float("nan"), float("inf")], device=dev)
grad = torch.randn_like(z)
report = {}
def compare(name, fused, formula, exact):
    nan = formula.isnan()
    same_nan = torch.equal(fused.isnan(), nan)
    d = (fused[~nan] - formula[~nan]).abs().nan_to_num(0)
    scale = formula[~nan].abs().nan_to_num(0).max().item()
    report[name] = {"exact": torch.equal(fused[~nan], formula[~nan]), "same_nan": same_nan,
                    "max_abs_diff": d.max().item(), "scale": scale, "must_be_exact": exact}
    print(f"{name:<12} exact={report[name]['exact']} nan_ok={same_nan} max|diff|={d.max().item():.3g} (scale {scale:.3g})")
report_sign = torch.equal(ops.sign(z), ops.sign_torch(z))
print("sign exact", report_sign); report["sign"] = {"exact": report_sign}
params = {"reste": {"o": 3.0}, "ede": {}, "rbnn": {}, "fda": {}, "clipped_ste": {}, "approx_sign": {}, "swish_sign": {}}
for name, p in params.items():
    est = reste.estimator(name, **p).to(dev)
    if name in ("ede", "rbnn", "fda"):
        est.set_progress(0.5)
    ops.set_triton_enabled(True); fused = est.surrogate_grad(z, grad.clone())
    ops.set_triton_enabled(False); formula = est.surrogate_grad(z, grad.clone())
    ops.set_triton_enabled(True)
    compare(name, fused, formula, name in ("clipped_ste", "approx_sign", "rbnn"))
for scale in ("channel_mean", "layer_mean"):
    layer = reste.nn.BinaryConv2d(64, 128, 3, weight_scale=scale, input_estimator=None).to(dev)
    G = torch.randn_like(layer.weight)
    out = {}
    for on in (True, False):
        ops.set_triton_enabled(on); layer.weight.grad = None
        wq = layer.quantized_weight(); wq.backward(G); out[on] = (wq.detach(), layer.weight.grad.clone())
    ops.set_triton_enabled(True)
    compare(f"weight_{scale}", out[True][0], out[False][0], False)
    compare(f"wgrad_{scale}", out[True][1], out[False][1], False)
# torch.compile through the Triton ops (RESTE_TRITON=compile's setting): no graph break, same values
ops._TRITON_IN_COMPILE = True
est = reste.estimator("reste", o=3.0).to(dev)
x = torch.randn(64, 64, 32, 32, device=dev, requires_grad=True)
f = lambda x: (est(x * 1.0) * 2.0).sum()
try:
    y = torch.compile(f, fullgraph=True)(x); y.backward(); gc = x.grad.clone(); x.grad = None
    f(x).backward()
    report["compile_fullgraph"] = {"ok": True, "max_abs_diff": (gc - x.grad).abs().max().item()}
except Exception as err:
    report["compile_fullgraph"] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
print("compile fullgraph:", report["compile_fullgraph"])
json.dump(report, open(__import__("os").environ["OUT"] + "/triton_check.json", "w"), indent=2)
PYEOF
    timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py 2>&1 | tail -3
fi
if want issue17; then  # issue 17's targets: eager (Triton on and off), compiled, CUDA graphs; ResNet-18 at 256
    JSON="$RESULTS/train_cuda_${GPU_TAG}_issue17_$(date +%F).json"
    timeout 420 $PY benchmarks/bench_train.py --device cuda --models resnet20,vgg_small \
        --modes eager,compiled,reduce-overhead --triton on,off --rounds 3 --steps 10 \
        --out "$OUT/issue17_small.json" 2>&1 | tee "$OUT/issue17_small.log" | tail -16
    timeout 420 $PY benchmarks/bench_train.py --device cuda --models resnet18:256 \
        --modes eager,compiled --triton on,off --rounds 3 --steps 5 \
        --out "$OUT/issue17_resnet18.json" 2>&1 | tee "$OUT/issue17_resnet18.log" | tail -10
    # one JSON: both runs' rows and estimator timings, the targets checked over all of them
    $PY - "$OUT/issue17_small.json" "$OUT/issue17_resnet18.json" "$JSON" <<'PYEOF'
import json, os, sys
sys.path.insert(0, "benchmarks")
import bench_train
parts = [json.load(open(p)) for p in sys.argv[1:3] if os.path.exists(p)]
if parts:
    merged = dict(parts[0], command=[p["command"] for p in parts])
    merged["train_step"] = [row for p in parts for row in p["train_step"]]
    merged["estimator"] = [e for p in parts for e in p["estimator"]]
    merged["targets"] = bench_train.check_targets(merged)
    json.dump(merged, open(sys.argv[3], "w"), indent=2)
    for t in merged["targets"]:
        print("target", t["what"], round(t["value"], 3), "met" if t["met"] else "NOT met")
    print("wrote", sys.argv[3])
PYEOF
    cp "$JSON" "$OUT/" 2>/dev/null
fi
if want smoke; then  # no GPU needed: every benchmark path on the CPU (numbers meaningless) and the interpreter tests
    $PY benchmarks/bench_train.py --device cpu --quick --models resnet20,vgg_small,resnet18:256 \
        --modes eager --out "$OUT/smoke_cpu.json" 2>&1 | tail -6
    $PY -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py 2>&1 | tail -2
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
if want train_auto; then  # train.compile=auto (the default): compiles on CUDA, prints the first step's time
    timeout 150 $PY -m reste train train.device=cuda train.amp=bf16 train.epochs=1 \
        out.dir="$RUNS" out.name=auto 2>&1 | grep -E "first step|epoch 1/1|final" | tail -4
    cp "$RUNS/auto/summary.json" "$OUT/auto_summary.json"
fi
if want torchrun; then
    timeout 60 torchrun --standalone --nproc_per_node=1 -m reste train train.device=cuda \
        train.epochs=1 data.subset=12800 out.dir="$RUNS" out.name=nccl 2>&1 | tail -5
    cp "$RUNS/nccl/summary.json" "$OUT/nccl_summary.json"
fi
echo; echo "=== done ($(date +%T))"
