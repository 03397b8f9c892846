#!/usr/bin/env bash
# Build the CPU test venv of one supported SGLang version, for tests/server/sglang:
#
#   scripts/setup_sglang_venv.sh                        # 0.5.16 -> .venv-sglang
#   SGLANG_VERSION=0.5.23 scripts/setup_sglang_venv.sh  # 0.5.23 -> .venv-sglang-0.5.23
#
# sglang pins its own torch (0.5.16: 2.11, 0.5.23: 2.14.1) and CUDA kernels; here it is
# installed with --no-deps on the local CPU torch 2.13 build plus the light deps its
# scheduler-side modules need at import time (requirements-sglang-cpu[-VERSION].txt, all
# constrained by constraints-sglang-cpu.txt so that pip never replaces torch). A fake
# torchvision (tests/_fake_torchvision) stands in for the real one, which fails on CPU torch.
# Both venvs share pip's download cache (pip's default, ~/.cache/pip).
# Idempotent: a stamp file records the inputs; a second run with the same inputs is a no-op.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SGLANG_VERSION="${SGLANG_VERSION:-0.5.16}"
# Keep in step with leyline.server.sglang.compat.SUPPORTED_VERSIONS.
case "$SGLANG_VERSION" in
  0.5.16)
    DEFAULT_VENV="$ROOT/.venv-sglang"
    REQUIREMENTS="$ROOT/requirements-sglang-cpu.txt" ;;
  0.5.23)
    DEFAULT_VENV="$ROOT/.venv-sglang-0.5.23"
    REQUIREMENTS="$ROOT/requirements-sglang-cpu-0.5.23.txt" ;;
  *)
    echo "setup_sglang_venv: SGLANG_VERSION=$SGLANG_VERSION is not supported (0.5.16, 0.5.23)" >&2
    exit 2 ;;
esac
VENV="${LEYLINE_SGLANG_VENV:-$DEFAULT_VENV}"
PY="${PYTHON:-python3.11}"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.installed"

inputs_hash() {
  { echo "$SGLANG_VERSION"
    cat "$REQUIREMENTS" "$ROOT/constraints-sglang-cpu.txt" \
      "$ROOT/pyproject.toml" "$ROOT/scripts/setup_sglang_venv.sh" \
      $(find "$ROOT/tests/_fake_torchvision" -name "*.py" -o -name "*.toml" | sort)
  } | sha256sum | cut -d' ' -f1
}

want="$(inputs_hash)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "setup_sglang_venv: $VENV (sglang $SGLANG_VERSION) is up to date"
  exit 0
fi

start=$SECONDS
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" "torch==$TORCH_VERSION"
"${pip[@]}" --no-deps "sglang==$SGLANG_VERSION"
"${pip[@]}" -r "$REQUIREMENTS" -c "$ROOT/constraints-sglang-cpu.txt"
# Test-only stand-in: sglang imports torchvision at module level in a few places.
"${pip[@]}" --no-deps "$ROOT/tests/_fake_torchvision"
"${pip[@]}" --no-deps -e "$ROOT"
SGLANG_VERSION="$SGLANG_VERSION" TORCH_VERSION="$TORCH_VERSION" "$VENV/bin/python" - <<'PY'
import os

import torch
import sglang
from sglang.srt.mem_cache.radix_cache import RadixCache  # noqa: F401
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool  # noqa: F401
from sglang.srt.managers import scheduler  # noqa: F401
from sglang.srt.entrypoints import http_server  # noqa: F401
import leyline.server.sglang.cache  # noqa: F401  (imports the compat layer: refuses other versions)
assert sglang.__version__ == os.environ["SGLANG_VERSION"], sglang.__version__
assert torch.__version__.startswith(os.environ["TORCH_VERSION"]), torch.__version__
print("setup_sglang_venv: sglang", sglang.__version__, "torch", torch.__version__)
PY
echo "$want" > "$STAMP"
echo "setup_sglang_venv: $VENV done in $((SECONDS - start)) s"
