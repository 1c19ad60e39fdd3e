# Sourced by scripts/demo and scripts/test: create or reuse the venv and install fjordtune into it.
#   FJORDTUNE_VENV   where the venv lives (default: <repo>/.venv)
# The CPU build of torch is installed first (torch==2.13.0 comes from local disk on our machines);
# any other torch spec would pull a multi-GB CUDA build. Images pin the CUDA build instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FJORDTUNE_VENV:-$ROOT/.venv}"
EXTRAS="${1:-local}"
TORCH_SPEC="torch==2.13.0"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating venv $VENV"
  python3 -m venv "$VENV"
fi
# reinstall when the dependency list or the extras change
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$EXTRAS-$TORCH_SPEC"
stamp="$VENV/.fjordtune-installed"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  log="$VENV/install.log"
  echo "[bootstrap] installing fjordtune[$EXTRAS] into $VENV (first time: 1-3 minutes, plus about 5 to compile "\
    "llama.cpp for the test extra; log: $log)"
  # llama-cpp-python compiles llama.cpp from its sdist: the library only (no tools, tests, server or vision
  # projector), which is all `fjordtune export --format gguf` calls. A CMAKE_ARGS of the caller wins.
  export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}"
  pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >>"$log" 2>&1; }
  : > "$log"
  if ! { pip_install --upgrade pip && pip_install "$TORCH_SPEC" && pip_install -e "$ROOT[$EXTRAS]"; }; then
    tail -n 40 "$log" >&2
    echo "[bootstrap] install failed; full log: $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# Ray token auth: the demo's Ray head and every shipped cluster run with it (outputs/devstack.env, cluster/,
# docs/security.md) and nothing here turns it off for them. Only the test suite's throwaway in-process
# clusters (ray.init(address="local") in tests) keep running without it, unless RAY_AUTH_MODE is set.
if [ "$EXTRAS" = test ]; then export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"; fi
export PYTHONUNBUFFERED=1
