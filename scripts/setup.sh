#!/usr/bin/env bash
# Idempotent set-up for aim-ds: apt packages (when missing), .venv, PyTorch, requirements.txt,
# then Pillow-SIMD as the PIL in use. Quick when everything is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.aim-ds-setup"
# g++: DeepSpeed JIT-compiles its C++ ops (cpu_adam for ZeRO offload, the CPU accelerator's shm comm).
APT_PACKAGES=(pkg-config libopencv-dev libturbojpeg0-dev libjpeg62-turbo-dev zlib1g-dev g++)
TORCH_CPU_VERSION=2.13.0

log() { echo "[setup] $*"; }

# 1. System libraries that FFCV (OpenCV, libjpeg-turbo) and Pillow-SIMD build against.
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing apt packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. The virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
[ -d /opt/wheels ] && export PIP_FIND_LINKS="${PIP_FIND_LINKS:-/opt/wheels}"

# This machine's pip config lists local index folders that may not exist; drop its per-package
# "is ignored" warnings so real errors stay readable.
pipq() { "${PIP[@]}" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

want="$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'deepspeed', 'ffcv', 'PIL')))" 2>/dev/null; then
  exit 0
fi

# 3. PyTorch: the CPU build where there is no CUDA (a bare `torch` would pull several GB of CUDA).
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    log "CUDA present: installing torch from the package index"
    pipq install "torch>=2.6"
  else
    log "no CUDA: installing torch==$TORCH_CPU_VERSION (CPU build)"
    pipq install "torch==$TORCH_CPU_VERSION"
  fi
fi

# 4. Everything else. numpy first: FFCV's build imports it.
log "installing requirements.txt"
pipq install numpy
pipq install -r requirements.txt
# aim_ds and data_prep importable from anywhere (editable: the checkout is the code that runs).
pipq install --no-deps -e .

# 5. Some dependencies (matplotlib, ...) pull plain Pillow, which shares the PIL package with
#    Pillow-SIMD and would shadow it. Remove it and put Pillow-SIMD's files back.
if "$VENV/bin/python" -m pip show pillow >/dev/null 2>&1; then
  log "replacing plain Pillow with Pillow-SIMD"
  pipq uninstall -y pillow
  pipq install --force-reinstall --no-deps pillow-simd
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md, pathlib, PIL
files = {str(pathlib.Path(f)) for f in md.files("pillow-simd") or ()}
assert "PIL/__init__.py" in files, "Pillow-SIMD does not own the PIL package"
print(f"[setup] PIL {PIL.__version__} from pillow-simd")
PY
# 6. DeepSpeedCPUAdam's C++ op (ZeRO optimizer offload) is JIT-built with ninja + g++ on first use:
#    ~50 s on 2 cores. Build it now, once, into the torch_extensions cache, instead of inside a run.
log "building DeepSpeed's cpu_adam op (cached in ~/.cache/torch_extensions)"
DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" "$VENV/bin/python" -c \
  "import torch; from deepspeed.ops.adam import DeepSpeedCPUAdam; DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])" \
  >/dev/null 2>&1 || log "warning: cpu_adam did not build; ZeRO offload will retry (and say why) at first use"
echo "$want" > "$STAMP"
log "done"
