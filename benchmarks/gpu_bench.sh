#!/usr/bin/env bash
# The prepared GPU measurement (issue 13): `vskip bench` in bf16 on CUDA at Qwen3-VL-8B widths,
# all 36 decoder layers, V = 1024 visual + 64 text rows; compiled full vs static-layout skip vs
# layout-polymorphic skip (inductor; the passes must accept the flash / efficient / cuDNN SDPA
# kernels the CUDA trace dispatches to), eager reference and eager gather; one JSON file.
#
# Then the video case (issue 18): 4 layers at the same widths, videos of 8 and 32 frames of 256
# tokens (2,048 and 8,192 visual rows) and one of 64 frames (16,384), same variants and JSON
# fields, into gpu_bench_video.json.
#
# One call on a lent GPU machine (the project's device tool), from the repo root:
#     bash benchmarks/gpu_bench.sh            # writes $OUT/gpu_bench.json (or ./gpu_bench.json)
#     VIDEO_ONLY=1 bash benchmarks/gpu_bench.sh   # the video case alone
# Budget: one call under 8 minutes on an H200: the image case is capped at 240 s (5 inductor
# compiles of 36 layers dominate; 3 rounds), the video case at 150 s, the long-context memory
# case at 60 s; a case that runs out of time is reported and the next one still runs.
# Works with the machine's own torch 2.11 / transformers 5.17 as with torch 2.13 / 5.24: the
# project installs with --no-deps (nothing to download there), Python 3.12 accepted.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index --ignore-requires-python -e . 2>&1 | tail -2 || true
python3 - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for m in ("transformers", "sympy", "rich", "safetensors"):
    print(m, importlib.import_module(m).__version__)
EOF
results=()
if [ -z "${VIDEO_ONLY:-}" ]; then
  timeout 240 python3 -m vskip_compile bench --device cuda --dtype bf16 --models qwen3-vl-8b --visual 1024 \
      --text 64 --layers 36 --repeats 3 --json > "$out/gpu_bench.json" || echo "image case failed or timed out"
  results+=("$out/gpu_bench.json")
fi
timeout 150 python3 -m vskip_compile bench --device cuda --dtype bf16 --models qwen3-vl-8b --video-frames 8 32 64 \
    --frame-tokens 256 --text 64 --layers 4 --repeats 3 --json > "$out/gpu_bench_video.json" || echo "video case failed or timed out"
results+=("$out/gpu_bench_video.json")
python3 - "${results[@]}" <<'EOF'
import json, sys
for r in (r for path in sys.argv[1:] for r in json.load(open(path))):
    m = r["median_ms"]
    print(f"{r['model']} {r['device']} {r['dtype']} S={r['S']} V={r['V']} layers={r['layers']}: "
          f"full {m['compiled full']:.1f} ms, static {m['compiled skip']:.1f}, poly {m['compiled poly']:.1f}; "
          f"ideal {r['ideal_speedup']:.3f}, realized static {r['realized']:.3f}, poly {r['realized_poly']:.3f}, "
          f"poly vs static {r['poly_vs_static']:.3f}; skip vs gather {r['skip_vs_gather']:.3f}; "
          f"peak MiB {r['peak_mib']}; max |skip - ref| {r['max_abs_diff_last_logits']:.2e}")
EOF
# Long context (issue 13/18): peak memory full vs skip at 4,096 and 16,384 visual rows, SDPA (no S x S mask) and FlexAttention, bf16.
timeout 180 python3 benchmarks/long_context_memory.py --device cuda --dtype bf16 --frames 16 64 --attention sdpa flex \
    --json "$out/gpu_long_context_memory.json" || echo "long-context memory run failed or timed out"
