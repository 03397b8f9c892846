#!/bin/bash
# Cross-instance attention (issue 18) on GPUs, from the project root of the GPU machine.
# NOT RUN YET: written in a CPU-only session (2026-12-05) with no GPU lent; the same code ran
# there only on CPU with gloo (evals/results/cpu-2core-2026-12-05-xattn/). Expect to debug.
#
#   1. the xattn tests on the GPU machine (the Triton merge compiled on CUDA; the transport
#      tests keep gloo on CPU tensors: their job is exactness)
#   2. two or more GPUs: benchmarks/xattn_calibrate.py over NCCL between cuda:0 and cuda:1 for
#      the Llama-3.1-8B (GQA) and DeepSeek-V2-Lite (MLA) shapes at their real layer counts, a
#      wider shape grid, and a plot of measured vs predicted round trips (route per step and
#      fetch once, per chunk size) from which the crossover reads; with one GPU this part is
#      skipped and reported as blocked (the calibration needs a rank per GPU)
#   3. the CPU/gloo calibration on the same host, as a same-run reference
#
# Results go to $OUT (default /tmp/leyline-gpu/xinstance). Needs torch with CUDA, triton,
# matplotlib (for the plot; skipped without it). The package need not be installed.
set -u
OUT=${OUT:-/tmp/leyline-gpu/xinstance}; mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
NGPU=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
echo "GPUs: $NGPU ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))" | tee "$OUT/device.txt"
[ "$NGPU" -ge 1 ] || { echo "no GPU"; exit 1; }

# 1. tests natively (the transport tests still use gloo on CPU tensors: their job is exactness)
python3 -m pytest -q -p no:cacheprovider tests/server/xattn 2>&1 | tee "$OUT/tests.log" | tail -3

GRID=(--batch 1 8 64 --chunk 128 512 2048 8192 --chunks 1 4 --reps 20 --layers 0)
if [ "$NGPU" -ge 2 ]; then
  # 3. NCCL between two GPUs of this host (NVLink where present; leave NVLink multicast off)
  NCCL_NVLS_ENABLE=0 python3 benchmarks/xattn_calibrate.py --backend nccl "${GRID[@]}" \
    --out "$OUT/nccl" 2>&1 | tee "$OUT/nccl.log"
  python3 - "$OUT/nccl/xattn_calibration.json" "$OUT/xinstance.png" <<'PY' || echo "plot skipped"
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rep = json.load(open(sys.argv[1]))
fig, axes = plt.subplots(1, len(rep["kinds"]), figsize=(12, 4.5), squeeze=False)
for ax, (name, kind) in zip(axes[0], rep["kinds"].items()):
    for b in sorted({r["batch"] for r in kind["rows"]}):
        rows = sorted((r for r in kind["rows"] if r["batch"] == b and r["n_chunks"] == 1),
                      key=lambda r: r["chunk_tokens"])
        x = [r["chunk_tokens"] for r in rows]
        ax.plot(x, [r["route_measured_s"] * 1e3 for r in rows], "o-", label=f"route b={b}")
        ax.plot(x, [r["route_predicted_s"] * 1e3 for r in rows], ":", color=ax.lines[-1].get_color())
    rows = sorted((r for r in kind["rows"] if r["batch"] == 1 and r["n_chunks"] == 1),
                  key=lambda r: r["chunk_tokens"])
    ax.plot([r["chunk_tokens"] for r in rows], [r["fetch_measured_s"] * 1e3 for r in rows],
            "ks-", label="fetch (once)")
    ax.plot([r["chunk_tokens"] for r in rows], [r["fetch_predicted_s"] * 1e3 for r in rows], "k:")
    ax.set(xscale="log", yscale="log", xlabel="chunk tokens (1 chunk)", ylabel="ms per step",
           title=f"{name}, {kind['layers']} layers (dotted: model)")
    ax.legend(fontsize=7)
fig.suptitle(rep["meta"]["device"])
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
print("wrote", sys.argv[2])
PY
else
  echo "one GPU: no NCCL pair; route vs fetch over NCCL needs 2+ GPUs (blocked)" | tee -a "$OUT/device.txt"
fi
# 2. the CPU/gloo calibration on this host as a same-run reference for the link terms
python3 benchmarks/xattn_calibrate.py --backend gloo --threads 4 --out "$OUT/gloo" 2>&1 | tee "$OUT/gloo.log"
echo "results in $OUT"
