#!/usr/bin/env bash
# Idempotent set-up for aim-ds: system libraries (apt as root when missing; otherwise it says which
# and how), .venv, PyTorch (the CUDA build where GPUs are), requirements.txt within the tested
# versions of requirements.lock, then Pillow-SIMD as the PIL in use. Quick when everything is in place.
#   scripts/setup.sh --check   only checks the system libraries (exit 1 naming the missing ones)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.aim-ds-setup"
# g++: DeepSpeed JIT-compiles its C++ ops (cpu_adam for ZeRO offload, the CPU accelerator's shm comm).
LOCK=requirements.lock  # the versions `make test` passed with; pip install -c keeps every install within them
TORCH_CUDA_INDEX=${TORCH_CUDA_INDEX:-https://download.pytorch.org/whl/cu128}

log() { echo "[setup] $*"; }

# 1. System libraries that FFCV (OpenCV, libjpeg-turbo) and Pillow-SIMD build against. Each is looked
#    for where a build finds it (pkg-config, the linker cache, headers, PATH), whatever installed it
#    (apt, a module system, conda), so a user without root gets through when they are present.
have_pc() { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists "$@" 2>/dev/null; }
have_lib() { /sbin/ldconfig -p 2>/dev/null | grep -q "$1" || ldconfig -p 2>/dev/null | grep -q "$1"; }
have_header() {
  local dir
  for dir in /usr/include /usr/local/include ${CONDA_PREFIX:+"$CONDA_PREFIX/include"} ${CPATH:+${CPATH//:/ }}; do
    [ -f "$dir/$1" ] && return 0
  done
  return 1
}
have_apt() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# Prints "apt-package:conda-package" for each missing library; empty when all are there.
missing_system_libraries() {
  command -v pkg-config >/dev/null 2>&1 || have_apt pkg-config || echo "pkg-config:pkg-config"
  have_pc opencv4 || have_pc opencv || have_apt libopencv-dev || echo "libopencv-dev:libopencv"
  have_pc libturbojpeg || have_lib libturbojpeg.so || have_apt libturbojpeg0-dev || echo "libturbojpeg0-dev:libjpeg-turbo"
  have_pc libjpeg || have_header jpeglib.h || have_apt libjpeg62-turbo-dev || echo "libjpeg62-turbo-dev:libjpeg-turbo"
  have_pc zlib || have_header zlib.h || have_apt zlib1g-dev || echo "zlib1g-dev:zlib"
  command -v "${CXX:-g++}" >/dev/null 2>&1 || echo "g++:gxx"
}
check_system_libraries() {
  local missing apt conda
  missing="$(missing_system_libraries)"
  [ -z "$missing" ] && { log "system libraries: all present"; return 0; }
  apt="$(cut -d: -f1 <<<"$missing" | sort -u | tr '\n' ' ')"
  conda="$(cut -d: -f2 <<<"$missing" | sort -u | tr '\n' ' ')"
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 && [ "${1:-}" != "--check" ]; then
    log "installing apt packages: $apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $apt >/dev/null
    return 0
  fi
  log "missing system libraries: $apt"
  log "install them with:  sudo apt-get install -y --no-install-recommends $apt"
  log "or without root:    conda install -c conda-forge $conda (then export PKG_CONFIG_PATH=\$CONDA_PREFIX/lib/pkgconfig)"
  log "(or load your cluster's modules for OpenCV, libjpeg-turbo, zlib and g++), then run make setup again"
  return 1
}
if [ "${1:-}" = "--check" ]; then  # only the check: exit 0 when every library is present
  check_system_libraries --check
  exit $?
fi
check_system_libraries || exit 1

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

want="$(cat requirements.txt "$LOCK" pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
gpus_visible() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU "; }
torch_is_cpu_build() { "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is not None)" 2>/dev/null; }
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'deepspeed', 'ffcv', 'PIL')))" 2>/dev/null; then
  exit 0
fi

# 3. PyTorch at the locked version: the CUDA build where GPUs are (a venv made on a login node
#    without GPUs got the CPU build: replaced here; the drivers refuse it on GPU nodes), the CPU build
#    elsewhere (a bare `torch` would pull several GB of CUDA).
if gpus_visible; then
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1 || torch_is_cpu_build; then
    log "GPUs present: installing the CUDA build of torch from $TORCH_CUDA_INDEX"
    pipq install -c "$LOCK" --force-reinstall --index-url "$TORCH_CUDA_INDEX" torch
  fi
elif ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  log "no GPUs: installing the CPU build of torch ($(grep '^torch==' "$LOCK"))"
  pipq install -c "$LOCK" torch
fi

# 4. Everything else. numpy first: FFCV's build imports it.
log "installing requirements.txt"
pipq install -c "$LOCK" numpy
pipq install -c "$LOCK" -r requirements.txt
# aim_ds and data_prep importable from anywhere (editable: the checkout is the code that runs).
pipq install --no-deps -e .

# 5. Some dependencies (matplotlib, ...) pull plain Pillow, which shares the PIL package with
#    Pillow-SIMD and would shadow it. Remove it and put Pillow-SIMD's files back.
if "$VENV/bin/python" -m pip show pillow >/dev/null 2>&1; then
  log "replacing plain Pillow with Pillow-SIMD"
  pipq uninstall -y pillow
  pipq install -c "$LOCK" --force-reinstall --no-deps pillow-simd
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
# On the CPU accelerator every first launch also JIT-builds the shared-memory all-reduce and the CPU fused
# Adam (a few minutes on 2 cores, inside the first test or demo run otherwise): build them here too.
if [ "${DS_ACCELERATOR:-cpu}" = cpu ]; then
  log "building DeepSpeed's CPU shm-comm and fused_adam ops (cached in ~/.cache/torch_extensions)"
  DS_ACCELERATOR=cpu "$VENV/bin/python" -c "from deepspeed.accelerator import get_accelerator as a
for name in ('ShareMemCommBuilder', 'FusedAdamBuilder'): a().create_op_builder(name).load()" \
    >/dev/null 2>&1 || log "warning: the CPU comm/fused_adam ops did not build; DeepSpeed will retry at first launch"
fi
echo "$want" > "$STAMP"
log "done"
