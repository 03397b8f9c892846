#!/bin/bash
# Source on the GPU machine from the project root (working tree + .gpu-sglang/ brought along):
#   source scripts/gpu/serve.sh      # unpacks the staged site once, installs this working tree
#   sglang_start NAME MODEL_DIR [extra server flags]   # waits until it serves (up to 420 s)
#   ... requests against http://127.0.0.1:$SGLANG_PORT ...
#   sglang_stop                      # stops only the process group sglang_start created
# Logs: ${OUT:-/tmp}/server_NAME.log. The real `python3 -m sglang.launch_server` runs; nothing
# is faked. Flags: docs/sglang.md ("The real server on the GPU machine").
SITE=/tmp/site
P=${GPU_SGLANG_DIR:-$PWD/.gpu-sglang}
[ -f "$P/site.tar.xz" ] || { echo "serve.sh: $P/site.tar.xz missing: run scripts/gpu/stage.sh and carry .gpu-sglang" >&2; return 1; }
if [ ! -f $SITE/.done ]; then
  mkdir -p $SITE && xz -T0 -dc "$P/site.tar.xz" | tar -x -C $SITE && touch $SITE/.done
fi
mkdir -p /tmp/tvmcache && { [ ! -f "$P/jitcache.tar.xz" ] || tar -xJf "$P/jitcache.tar.xz" -C /tmp/tvmcache; }
rm -rf /tmp/models && cp -r "$P/models" /tmp/models
for d in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13; do
  [ -e "$d/bin/nvcc" ] && { export CUDA_HOME=$d; break; }
done
export PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH
export PYTHONPATH=$SITE TVM_FFI_CACHE_DIR=/tmp/tvmcache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Leyline from the working tree: its sglang.srt.plugins entry point needs an installed dist-info.
python3 -m pip install -q --no-deps --no-index --no-build-isolation --no-compile --upgrade \
  --target $SITE "${LEYLINE_SRC:-.}" || { echo "serve.sh: installing leyline FAILED" >&2; return 1; }
SGLANG_PORT=${SGLANG_PORT:-30000}
# SGLang's prefill CUDA graphs (its default, "breakable" graphs) stay on: without them every
# prefill round, a recompute window's included, pays ~30-40 ms of kernel launches from Python
# (measured on an H100). SGLANG_PREFILL_CUDA_GRAPH=0 turns them off (the recipe's setting).
SGLANG_COMMON="--dtype bfloat16 --attention-backend triton --sampling-backend pytorch \
 --grammar-backend none --page-size 1 --enable-cache-report --host 127.0.0.1 --port $SGLANG_PORT \
 --cuda-graph-max-bs-decode 8 --served-model-name default"
[ "${SGLANG_PREFILL_CUDA_GRAPH:-1}" = 1 ] || SGLANG_COMMON="$SGLANG_COMMON --disable-prefill-cuda-graph"
SGLANG_PID=""
sglang_stop() {
  [ -n "$SGLANG_PID" ] || return 0
  kill -TERM -- -"$SGLANG_PID" 2>/dev/null
  for _ in $(seq 1 20); do kill -0 -- -"$SGLANG_PID" 2>/dev/null || break; sleep 1; done
  kill -KILL -- -"$SGLANG_PID" 2>/dev/null; SGLANG_PID=""
  for _ in $(seq 1 20); do [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ] && break; sleep 1; done
}
_sglang_up() { python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$SGLANG_PORT/$1', timeout=$2)" >/dev/null 2>&1; }
sglang_start() {  # NAME MODEL_DIR [flags...]
  local name=$1 model=$2; shift 2
  local log=${OUT:-/tmp}/server_$name.log
  setsid python3 -m sglang.launch_server --model-path "$model" $SGLANG_COMMON "$@" > "$log" 2>&1 &
  SGLANG_PID=$!
  local t0=$SECONDS
  while [ $((SECONDS - t0)) -lt 420 ]; do
    kill -0 $SGLANG_PID 2>/dev/null || { echo "sglang_start: $name died"; tail -30 "$log"; SGLANG_PID=""; return 1; }
    if _sglang_up v1/models 2; then _sglang_up health_generate 60; echo "sglang_start: $name ready after $((SECONDS - t0)) s"; return 0; fi
    sleep 2
  done
  echo "sglang_start: $name not ready"; tail -30 "$log"; sglang_stop; return 1
}
trap sglang_stop EXIT
