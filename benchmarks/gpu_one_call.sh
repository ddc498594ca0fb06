#!/usr/bin/env bash
# The whole GPU benchmark in one call of the device tool (10 minutes at most), results in $OUT.
#
# Here, once (downloads the peers that the GPU image lacks into the ignored folder wheels/):
#   bash benchmarks/gpu_one_call.sh --download
# Then, through the device tool:
#   run(command="bash benchmarks/gpu_one_call.sh", carry=["wheels"], timeout_s=600)
# and afterwards, here, on the fetched files:
#   python benchmarks/plot.py <files_at>/bench.csv --out benchmarks/results/<device>/
#
# Steps, each bounded so the total stays under TOTAL_S (default 570 s):
#   1. install the carried wheels into /tmp/site (no network there), record versions
#   2. correctness at a realistic bf16 shape: apo-kernels check (values and every gradient)
#   3. the op-level suite (every provider, N=16384 first, then the other N) until its budget ends
#   4. the end-to-end DPOTrainer step (TRL default vs our kernels), 0.5B Qwen2-shaped model
#   5. tests/test_gpu.py with APO_TEST_CUDA=1, in whatever time is left
# Files written to $OUT (at most 8 come back): env.txt, check.txt, bench.csv, bench.md, e2e.csv,
# gpu_tests.txt, log.txt, model_vs_measured.md.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--download" ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d wheels trl==1.16.0 datasets==5.2.0 "dill<0.4.2" "multiprocess<0.70.20" \
        liger-kernel==0.8.5 cut-cross-entropy==25.1.1
    exit $?
fi

OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
TOTAL_S="${TOTAL_S:-570}"
START=$(date +%s)
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 COLUMNS=200
unset TRITON_INTERPRET
PY=python3

echo "== 1. install carried wheels ($(ls wheels/*.whl 2>/dev/null | wc -l) found)"
if ls wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheels/*.whl \
        || echo "wheel install failed: TRL, Liger and cut-cross-entropy rows will be skipped"
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY - <<'PY'
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for p in ("triton", "transformers", "trl", "datasets", "liger-kernel", "cut-cross-entropy", "pyarrow"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "missing")
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== 2. correctness (bf16, Llama-3.2-1B head, 4096 tokens) [$(left) s left]"
timeout 120 $PY -m apo_kernels.cli check --shapes 4096x2048x128256 512x2304x256000 --dtypes bfloat16 \
    --backends triton --softcap 30 > "$OUT/check.txt" 2>&1
echo "check exit code $? (see check.txt)"; tail -5 "$OUT/check.txt"

E2E_RESERVE=150
BENCH_S=$(( $(left) - E2E_RESERVE - 60 ))
echo "== 3. op-level suite, budget ${BENCH_S} s [$(left) s left]"
if (( BENCH_S > 30 )); then
    # the budget stops new measurements; the hard limit leaves room for one that is running
    timeout $(( BENCH_S + 60 )) $PY benchmarks/run_suite.py --out "$OUT" --no-plots \
        --budget-s "$BENCH_S" --timeout-s 180 --quiet
    echo "suite exit code $?"
fi
[[ -f "$OUT/bench.csv" ]] && $PY benchmarks/to_markdown.py "$OUT/bench.csv" --n 16384 --logits all \
    --out "$OUT/bench.md" && cat "$OUT/bench.md"
# measured beside the cost model's predictions (same shapes; see docs/cost_model.md)
[[ -f "$OUT/bench.csv" ]] && $PY -m apo_kernels.cli model --measured "$OUT/bench.csv" --markdown \
    > "$OUT/model_vs_measured.md" 2>&1

echo "== 4. end-to-end DPOTrainer step [$(left) s left]"
E2E_S=$(( $(left) - 20 ))
if (( E2E_S > 60 )); then
    timeout "$E2E_S" $PY benchmarks/e2e_step.py --csv "$OUT/e2e.csv"
    echo "e2e exit code $?"
fi

echo "== 5. GPU tests [$(left) s left]"
T_S=$(( $(left) - 10 ))
if (( T_S > 30 )); then
    APO_TEST_CUDA=1 timeout "$T_S" $PY -m pytest tests/test_gpu.py -q -x -p no:cacheprovider \
        > "$OUT/gpu_tests.txt" 2>&1
    echo "gpu tests exit code $?"; tail -3 "$OUT/gpu_tests.txt"
fi
echo "== done in $(( $(date +%s) - START )) s"
