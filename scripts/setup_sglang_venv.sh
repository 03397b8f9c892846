#!/usr/bin/env bash
# Build .venv-sglang: SGLang 0.5.16 importable on a CPU machine, for tests/server/sglang.
#
# sglang pins torch 2.11 and CUDA kernels; here it is installed with --no-deps on the local
# CPU torch 2.13 build plus the light deps its scheduler-side modules need at import time
# (requirements-sglang-cpu.txt, constrained by constraints-sglang-cpu.txt). A fake
# torchvision (tests/_fake_torchvision) stands in for the real one, which fails on CPU torch.
# Idempotent: a stamp file records the inputs; a second run with the same inputs is a no-op.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LEYLINE_SGLANG_VENV:-$ROOT/.venv-sglang}"
PY="${PYTHON:-python3.11}"
SGLANG_VERSION="0.5.16"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.installed"

inputs_hash() {
  cat "$ROOT/requirements-sglang-cpu.txt" "$ROOT/constraints-sglang-cpu.txt" \
    "$ROOT/pyproject.toml" "$ROOT/scripts/setup_sglang_venv.sh" \
    $(find "$ROOT/tests/_fake_torchvision" -name "*.py" -o -name "*.toml" | sort) | sha256sum | cut -d' ' -f1
}

want="$(inputs_hash)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "setup_sglang_venv: $VENV is up to date"
  exit 0
fi

start=$SECONDS
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" "torch==$TORCH_VERSION"
"${pip[@]}" --no-deps "sglang==$SGLANG_VERSION"
"${pip[@]}" -r "$ROOT/requirements-sglang-cpu.txt" -c "$ROOT/constraints-sglang-cpu.txt"
# Test-only stand-in: sglang imports torchvision at module level in a few places.
"${pip[@]}" --no-deps "$ROOT/tests/_fake_torchvision"
"${pip[@]}" --no-deps -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import torch
import sglang
from sglang.srt.mem_cache.radix_cache import RadixCache  # noqa: F401
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool  # noqa: F401
from sglang.srt.managers import scheduler  # noqa: F401
from sglang.srt.entrypoints import http_server  # noqa: F401
import leyline.server.sglang  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("setup_sglang_venv: sglang", sglang.__version__, "torch", torch.__version__)
PY
echo "$want" > "$STAMP"
echo "setup_sglang_venv: done in $((SECONDS - start)) s"
