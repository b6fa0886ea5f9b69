#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine with little time on it:
#
#   bash benchmarks/gpu_session.sh OUTDIR
#
# 1. what the machine is (GPU, driver, torch, triton);
# 2. a smoke test: one BatchNorm2d step on the GPU against torch.nn, backend "auto" (PyTorch's
#    kernel there) and "triton" (stops here if it fails);
# 3. the tests that run on CUDA where there is one (Triton kernels, fused kernels, the backend
#    contract, the CUDA module tests, the GPU bench, the model benchmark);
# 4. benchmarks/half_accuracy.py --device cuda (half-precision gradients against float64);
# 5. where a layer call spends its time: torch.profiler tables (GPU kernels, host) of training
#    steps, backend "auto" (PyTorch's kernel and our guard) and "triton", small and large;
# 6. benchmarks/triton_host_cost.py (the Triton layer's host time per call: ours, ours with the
#    kernels stubbed, torch.nn; launches and ATen ops per call);
# 7. benchmarks/layer_cost.py --device cuda (one layer, ours against torch.nn, by size);
# 8. benchmarks/model_step.py --device cuda (whole ResNets; its JSON written after each
#    configuration, so a stage cut short keeps what it measured);
# 9. benchmarks/gpu_bench.py (kernels against PyTorch eager, no torch.compile: its compile
#    time does not fit a short lease; BENCH_ARGS adds options, e.g. --shapes).
#
# Each stage has its own time limit (seconds, overridable: TESTS_S, HOST_S, LAYER_S, MODEL_S,
# BENCH_S) so that one slow stage cannot take the others' time; with the smoke test's 90 s they
# add up to 600 s at most, about 300 s in a run that goes well (the device tool allows 600 s a
# command). Everything lands in OUTDIR, in 9 files (what the device tool brings back). The machine needs PyTorch with CUDA, Triton,
# pytest(-xdist) and this repository's dependencies; the package runs from src/ (PYTHONPATH),
# nothing is installed.
set -u -o pipefail
OUT=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd) # absolute: the script moves to the repository's root
exec > >(tee "$OUT/session.log") 2>&1 # the whole log: the device tool returns only its tail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET # the GPU, not the interpreter
PY=${PYTHON:-python3}
stage() { echo "== $1 ($(date -u +%H:%M:%S))"; }

stage "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
$PY -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.get_device_name())'

stage "smoke"
timeout 90 $PY - <<'EOF' || exit 1
import torch

import batchnorm.torch as bt

x = torch.randn(8, 4, 6, 5, device="cuda", requires_grad=True)
for backend in ("auto", "triton"):
    ours, theirs = bt.BatchNorm2d(4, backend=backend).cuda(), torch.nn.BatchNorm2d(4).cuda()
    y_ours, y_theirs = ours(x), theirs(x)
    g_ours, g_theirs = (torch.autograd.grad(y, x, torch.ones_like(y))[0] for y in (y_ours, y_theirs))
    torch.testing.assert_close(y_ours, y_theirs)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    print(f"smoke {backend}: ran {ours.last_backend} | says: {bt.explain_backend(x, backend)}")
EOF

stage "tests"
# -v: every test's name and outcome as it finishes, so that a stage cut by its limit still says
# which failed (junit is written only at the end; on the H200 the suite took over 120 s).
timeout "${TESTS_S:-175}" $PY -m pytest -v -n 12 -p no:cacheprovider --junitxml="$OUT/junit.xml" \
    tests/kernels/test_triton.py tests/kernels/test_triton_fused.py tests/kernels/test_contract.py \
    tests/torch/test_torch_cuda.py tests/bench/test_bench_gpu.py tests/test_model_step.py \
    tests/torch/test_native_path.py tests/test_triton_host_cost.py tests/torch/test_compile.py \
    >"$OUT/tests.log" 2>&1
echo "tests: exit $?"
grep -E "(FAILED|ERROR) " "$OUT/tests.log" | head -n 20
tail -n 3 "$OUT/tests.log"

stage "half_accuracy"
timeout 40 $PY benchmarks/half_accuracy.py --device cuda

stage "call_profile"
timeout 45 $PY - >"$OUT/call_profile.txt" 2>&1 <<'EOF'
import torch
from torch.profiler import ProfilerActivity, profile

import batchnorm.torch as bt

for backend, shape in [("auto", (16, 64, 8, 8)), ("triton", (16, 64, 8, 8)),
                       ("triton", (32, 128, 56, 56))]:
    layer = bt.BatchNorm2d(shape[1], backend=backend).cuda()
    x = torch.randn(shape, device="cuda", requires_grad=True)
    dy = torch.randn(shape, device="cuda")
    for _ in range(3):
        layer(x).backward(dy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            layer(x).backward(dy)
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(f"== {backend} {shape}, 10 training steps, by GPU time ({layer.last_backend} ran)")
    print(table.table(sort_by="device_time_total", row_limit=20, max_name_column_width=70))
    print(f"== {backend} {shape}, by host time")
    print(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
EOF
echo "call_profile: exit $?"
grep -A16 "by GPU time" "$OUT/call_profile.txt" | cut -c1-170

stage "host_cost"
timeout "${HOST_S:-30}" $PY benchmarks/triton_host_cost.py --device cuda --repeats 100 \
    --json "$OUT/host_cost.json"
echo "host_cost: exit $?"

stage "layer_cost"
timeout "${LAYER_S:-40}" $PY benchmarks/layer_cost.py --device cuda 2>&1 | tee "$OUT/layer_cost.txt"

stage "model_step"
timeout "${MODEL_S:-120}" $PY benchmarks/model_step.py --device cuda --sizes "${SIZES:-112}" \
    --repeats "${REPEATS:-12}" --out "$OUT/model_step.json" >"$OUT/model_step.txt" 2>&1
echo "model_step: exit $?"
tr '\r' '\n' <"$OUT/model_step.txt" | grep -E "px batch|^pair" | cut -c1-400

stage "gpu_bench"
LOGS=$(mktemp -d)
# shellcheck disable=SC2086  # BENCH_ARGS holds several options
timeout "${BENCH_S:-60}" $PY benchmarks/gpu_bench.py --no-compile --no-progress ${BENCH_ARGS:-} \
    >"$LOGS/gpu_bench.txt" 2>&1
echo "gpu_bench: exit $?"
tail -n 30 "$LOGS/gpu_bench.txt"
tar czf "$OUT/gpu_bench.tgz" -C "$LOGS" gpu_bench.txt -C "$PWD" benchmarks/results/log.csv \
    $(cd "$PWD" && ls benchmarks/results/gpu-nvidia-* 2>/dev/null)
stage "done"
