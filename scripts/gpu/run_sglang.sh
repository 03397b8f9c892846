#!/bin/bash
# The GPU run of the real SGLang 0.5.16 server, from the project root on the GPU machine (with
# .gpu-sglang/ from scripts/gpu/stage.sh carried along). One argument picks the part:
#   speed        Llama-3.1-8B shape (dummy weights): default radix, then the leyline backend;
#                benchmarks/sglang_server.py on each; the table (its `repair` case, REPAIR with
#                the default window, has not run yet: added 2026-12-05 with no GPU lent)
#   speed-mla    the same for the DeepSeek-V2-Lite shape (MLA attention, dense MLPs)
#   correctness  a seeded random Llama (real outputs) on the leyline backend with every splice
#                verified; benchmarks/sglang_correctness.py
#   wrap         leyline.wrap under the real openai client, a multi-turn agent conversation
#                with truncation edits against the leyline backend; scripts/gpu/wrap_conversation.py
#   replay       `leyline eval replay` (the paper's message-edit workload, Llama-3.1-8B shape):
#                the plain client on the default radix cache (server 1), then every Leyline arm
#                on the leyline backend (server 2), merged into one report in $OUT/replay_$MIX
#                (summary.md, results.json, 3 plots). MIX=paper|agent, SCALE (1.0), CONC
#                (1,4,8,16), CONVS (16), ARMS (the Leyline arms; the plugin serves `repair`
#                since issue 14: add it to compare). Not run yet: written while no GPU was lent (2026-12-05); budget
#                ~8-10 min per MIX at scale 1.0 (split CONC over calls if one nears 10 min).
# Results and server logs go to $OUT (default /tmp/leyline-gpu). SGLang's prefill CUDA graphs
# are on (serve.sh) and the speed files are named *_pcg_*; SGLANG_PREFILL_CUDA_GRAPH=0 turns
# them off (files without _pcg; MLA models run without them either way: SGLang disables them).
set -u
OUT=${OUT:-/tmp/leyline-gpu}; mkdir -p "$OUT"; export OUT
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/gpu/serve.sh || exit 1
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "device: $DEV"
speed() {  # NAME MODEL_DIR [server flags...]
  local tag=$1 model=$2; shift 2
  [ "${SGLANG_PREFILL_CUDA_GRAPH:-1}" = 1 ] && tag=${tag}_pcg  # prefill CUDA graphs on
  for backend in ${BACKENDS:-default leyline}; do
    local flags=() ley=()
    [ $backend = leyline ] && { flags=(--radix-cache-backend leyline); ley=(--leyline); }
    sglang_start "${tag}_$backend" "$model" --load-format dummy --mem-fraction-static 0.8 "$@" \
      "${flags[@]}" || return 1
    python3 benchmarks/sglang_server.py run --label $backend "${ley[@]}" --device "$DEV" --reps "${REPS:-5}" \
      --tokenizer "$model/tokenizer.json" --out "$OUT/${tag}_$backend.json" \
      >> "$OUT/${tag}_bench.log" 2>&1 || { tail -20 "$OUT/${tag}_bench.log"; sglang_stop; return 1; }
    sglang_stop
  done
  [ "${BACKENDS:-default leyline}" = "default leyline" ] || return 0
  python3 benchmarks/sglang_server.py report "$OUT/${tag}_default.json" "$OUT/${tag}_leyline.json" \
    | tee "$OUT/${tag}_table.md"
}
case "${1:-speed}" in
  speed) speed llama8b /tmp/models/llama-3.1-8b ;;
  speed-mla) speed dsv2lite /tmp/models/deepseek-v2-lite-dense ;;
  correctness)
    python3 scripts/gpu/make_random_model.py /tmp/models/random-llama \
      --tokenizer /tmp/models/llama-3.1-8b || exit 1
    LEYLINE_SGLANG_VERIFY_SPLICES=1 sglang_start check /tmp/models/random-llama \
      --mem-fraction-static 0.5 --radix-cache-backend leyline || exit 1
    python3 benchmarks/sglang_correctness.py --out "$OUT/correctness.json" \
      --tokenizer /tmp/models/random-llama/tokenizer.json 2>&1 | tee "$OUT/correctness.log"
    sglang_stop ;;
  wrap)
    sglang_start wrap /tmp/models/llama-3.1-8b --load-format dummy --mem-fraction-static 0.8 \
      --radix-cache-backend leyline || exit 1
    python3 scripts/gpu/wrap_conversation.py --base-url "http://127.0.0.1:$SGLANG_PORT/v1" \
      --out "$OUT/wrap.json" 2>&1 | tee "$OUT/wrap.log"
    python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$SGLANG_PORT/v1/leyline/info').read().decode())" | tee -a "$OUT/wrap.log"
    sglang_stop ;;
  replay)
    MIX=${MIX:-paper}; R=$OUT/replay_$MIX
    eval_replay() { python3 -c 'import sys; from leyline.cli import main; sys.exit(main())' \
      eval replay --endpoint "http://127.0.0.1:$SGLANG_PORT/v1" --model default --mix "$MIX" \
      --scale "${SCALE:-1.0}" --conversations "${CONVS:-16}" --turns 6 \
      --concurrency "${CONC:-1,4,8,16}" --max-tokens 4 --no-progress "$@"; }
    sglang_start replay_default /tmp/models/llama-3.1-8b --load-format dummy \
      --mem-fraction-static 0.8 || exit 1
    eval_replay --arms exact --label radix --out "$R.radix" > "$OUT/replay_${MIX}_radix.log" 2>&1
    sglang_stop
    sglang_start replay_leyline /tmp/models/llama-3.1-8b --load-format dummy \
      --mem-fraction-static 0.8 --radix-cache-backend leyline || exit 1
    eval_replay --arms "${ARMS:-exact,amortize,amortize+content,forget}" --label leyline \
      --merge-with "$R.radix/results.json" --out "$R" > "$OUT/replay_${MIX}.log" 2>&1
    sglang_stop
    # SGLang's own idle-time KV checks (scheduler_components/invariant_checker.py) warn in the log
    grep -iE "memory leak|double free|use-after-free" "$OUT"/server_replay_*.log && echo "replay: LEAK reported" \
      || echo "replay: no memory leak reported by the servers"
    cat "$R/summary.md" ;;
  *) echo "usage: $0 speed|speed-mla|correctness|wrap|replay" >&2; exit 2 ;;
esac
