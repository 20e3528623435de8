#!/usr/bin/env bash
# Issue 5's checks on a GPU machine, in one command (the device tool's machine: no registry, so nothing is
# pip-installed from the network). Builds the extension with CUDA for sm_90 in build/gpu, puts it next to the
# Python sources, then: the gpu-marked tests, compute-sanitizer memcheck on a small case, the benchmark
# (bench/gpu_bench.py), racecheck on a smaller case. Logs go to $OUT (default /tmp/gpu_out).
#
#   EIGEN_PREFIX  a prefix holding share/eigen3/cmake (default: the cmeel-eigen prefix carried in .devcarry)
#   WHEELS        a folder of wheels to install into /tmp/site first (POT, GeomLoss), if present
#
# Preparing the carried folders on a machine with the test venv and network (both git-ignored via
# .git/info/exclude: /.devcarry/ and /.whl/; 20 + 33 MB):
#   mkdir -p .devcarry && cp -r .venv/lib/python3*/site-packages/cmeel.prefix .devcarry/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl pot==0.9.7.post1 geomloss
# Session 22 ran it as: OUT=$OUT TESTS_TIMEOUT=90 SANITIZE_TIMEOUT=60 BENCH_TIMEOUT=200 \
#   BENCH_ARGS="--budget-s 25 --peer-budget-s 10" bash bench/gpu_check.sh   (about 4 min on an H200)
# Session 23's last run (2 min 10 s): STEPS="build tests memcheck bench" and BENCH_ARGS adding
#   "--contenders segtransfer torch-plain pot geomloss segtransfer-dense segtransfer-laststage", with
#   SEGTRANSFER_DEBUG=1 for the per-stage trace in gpu_bench.log (bench/RESULTS.md, "GPU, session 23").
# Next run: add segtransfer-ilp4 to those contenders (session 31's opt-in half-steps; docs/cuda.md) and
#   "sampler" to STEPS (session 37's device sampler: same draws as the host, and its time).
#   STEPS         which steps to run, in this order (default "build tests memcheck sampler bench racecheck ncu")
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
STEPS=${STEPS:-build tests memcheck sampler bench racecheck ncu}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/steps.log"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  nvcc --version | tail -1; $PY -c 'import sys, torch; print(sys.version.split()[0], torch.__version__)'
  lscpu | grep -m1 'Model name'; nproc; } >> "$OUT/steps.log" 2>&1

if [ -d "${WHEELS:-.whl}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${WHEELS:-.whl}"/*.whl >> "$OUT/build.log" 2>&1 && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}

# compute-sanitizer on a small case: both precisions, otce and sinkhorn. memcheck with the leak check;
# racecheck on a smaller, easier one (it serialises every launch).
sanitize() {  # tool
  cat > /tmp/small_case.py <<'EOF'
import os, sys, numpy as np, segtransfer as st
race = sys.argv[1:] == ["race"]
n, eps = (48, 1.0) if race else (150, 0.2)
rng = np.random.default_rng(0)
# 0: Sinkhorn only; 1: with the Newton polish (the default); at eps / 4 the plans are sparse enough
# for Newton's products to run on the pattern (SEGTRANSFER_DEBUG prints its density)
for newton, e in (("0", eps), ("1", eps), ("1", eps / 4)):
    os.environ["SEGTRANSFER_CUDA_NEWTON"] = newton
    for dt in (np.float32, np.float64):
        xs, xt = rng.normal(size=(400, 6)).astype(dt), (rng.normal(size=(420, 6)) + 0.3).astype(dt)
        ys, yt = rng.integers(0, 4, 400), rng.integers(0, 3, 420)
        r = st.otce(xs, ys, xt, yt, n_pixels=n, repeats=3, epsilon=e, device="cuda")
        s = st.sinkhorn(xs[:n], xt[:n + 10], epsilon=e, device="cuda")
        print("newton", newton, dt.__name__, r.scores, r.all_converged, r.iterations, s.converged, s.marginal_error)
EOF
  local tool=$1
  extra=""; [ $tool = memcheck ] && extra="--leak-check full"
  stamp "compute-sanitizer $tool"
  arg=""; [ $tool = racecheck ] && arg=race
  timeout ${SANITIZE_TIMEOUT:-150} compute-sanitizer --tool $tool $extra --error-exitcode 9 $PY /tmp/small_case.py $arg \
    > "$OUT/sanitize_$tool.log" 2>&1
  stamp "compute-sanitizer $tool rc=$?: $(grep -m1 'ERROR SUMMARY\|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log")"
}

if [[ " $STEPS " == *" build "* ]]; then
  stamp "build"
  cmake -S . -B build/gpu -G Ninja -DSEGTRANSFER_PYTHON=ON -DSEGTRANSFER_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCMAKE_PREFIX_PATH="${EIGEN_PREFIX:-$PWD/.devcarry/cmeel.prefix}" -DPython_EXECUTABLE="$(command -v $PY)" \
    -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" >> "$OUT/build.log" 2>&1 \
    && ninja -C build/gpu >> "$OUT/build.log" 2>&1 || { stamp "build FAILED"; tail -40 "$OUT/build.log"; exit 1; }
  cp build/gpu/_core*.so python/segtransfer/
  $PY -c 'import segtransfer as st, segtransfer._core as c; print("cuda_available", st.cuda_available(), c.cuda_status())' \
    2>&1 | tee -a "$OUT/steps.log"
fi

if [[ " $STEPS " == *" tests "* ]]; then
  stamp "gpu tests"  # -n: pytest-xdist reports a crashed worker and goes on
  timeout ${TESTS_TIMEOUT:-240} $PY -m pytest -q -m gpu -n 6 -rfEsxX --tb=short --timeout=60 -p no:cacheprovider tests/test_cuda.py > "$OUT/gpu_tests.log" 2>&1
  stamp "gpu tests rc=$?: $(tail -1 "$OUT/gpu_tests.log")"
fi

[[ " $STEPS " == *" memcheck "* ]] && sanitize memcheck

if [[ " $STEPS " == *" bench "* ]]; then
  stamp "bench"
  timeout ${BENCH_TIMEOUT:-300} $PY bench/gpu_bench.py --out "$OUT/gpu_bench.json" ${BENCH_ARGS:-} > "$OUT/gpu_bench.log" 2>&1
  stamp "bench rc=$?"
fi
[[ " $STEPS " == *" racecheck "* ]] && sanitize racecheck

# The device sampler (session 37, written without a GPU): its draws against the host's, and its time
# (K = 10 draws of n = 10^4 over 10^5 and 4 x 10^6 pixels, best of 5 after a warm-up call).
if [[ " $STEPS " == *" sampler "* ]]; then
  stamp "sampler"
  timeout ${SAMPLER_TIMEOUT:-60} $PY - > "$OUT/sampler.log" 2>&1 <<'EOF'
import time, numpy as np
from segtransfer import _core
rng = np.random.default_rng(0)
for pixels in (100_000, 4_000_000):
    codes = np.where(rng.random(pixels) < 0.8, rng.integers(0, 19, pixels), -1).astype(np.int32)
    _core.sample_pixels_cuda(codes, 10_000, 10, 3, "x", 0)
    for name, fn in (("host", _core.sample_pixels), ("cuda", lambda *a: _core.sample_pixels_cuda(*a, 0))):
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn(codes, 10_000, 10, 3, "x")
            t.append(time.perf_counter() - t0)
        print(pixels, name, f"{min(t) * 1e3:.2f} ms")
    same = np.array_equal(_core.sample_pixels(codes, 10_000, 10, 3, "x"),
                          _core.sample_pixels_cuda(codes, 10_000, 10, 3, "x", 0))
    print(pixels, "same draws", same)
EOF
  stamp "sampler rc=$?: $(tr '\n' ' ' < "$OUT/sampler.log" | tail -c 300)"
fi

# Nsight Compute on the hot kernels of the benchmark's D = 19 case (one launch each, well into the
# solve): throughput against the device's peaks, memory and compute workload, occupancy.
if [[ " $STEPS " == *" ncu "* ]] && command -v ncu > /dev/null; then
  cat > /tmp/ncu_case.py <<'EOF'
import sys, numpy as np, segtransfer as st
sys.path.insert(0, "bench")
import data as bdata
xs, ys, xt, yt = bdata.make_task_pair(int(sys.argv[1]), 40000, 0, "float32", freq_spread=0.3)
r = st.otce(xs, ys, xt, yt, n_pixels=10000, repeats=10, epsilon=0.1, seed=0, device="cuda", timeout=30)
print(r.all_converged, r.iterations)
EOF
  for kn in row_step_kernel col_step_kernel newton_row_kernel newton_col_kernel; do
    stamp "ncu $kn"
    timeout ${NCU_TIMEOUT:-60} ncu --kernel-name $kn --launch-skip 30 --launch-count 1 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
      $PY /tmp/ncu_case.py 19 > "$OUT/ncu_$kn.log" 2>&1
  done
fi
stamp "done"
