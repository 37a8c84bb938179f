#!/usr/bin/env bash
# Idempotent set-up for hpcsrl: system packages, the repo virtualenv, GDAL bindings and Horovod.
#
# Used by both README commands (`make demo`, `make test`). A second run on a ready machine only
# checks stamps and finishes in seconds. Slow builds (GDAL bindings, Horovod with the C++17 fix)
# are cached as wheels under $HPCSRL_CACHE so a fresh virtualenv installs them in seconds.
# As non-root (a site cluster) it never calls apt-get: it uses what the environment modules
# provide and names exactly what is missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HPCSRL_VENV:-$ROOT/.venv}
CACHE=${HPCSRL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcsrl}
WHEELS=$CACHE/wheels
PY=${PYTHON:-python3}
HOROVOD_VERSION=0.28.1
TORCH_SPEC="torch==2.13.0"
# Versions are pinned loosely; torch is pinned exactly (any other spec pulls CUDA packages).
PY_PKGS=(numpy setuptools wheel "cython<3.2" pkgconfig "mpi4py>=4.0" h5py scikit-learn
         matplotlib tqdm pytest pytest-timeout ruff psutil pyyaml cloudpickle packaging cffi)
APT_PKGS=(openmpi-bin libopenmpi-dev libgdal-dev gdal-bin cmake g++ slurm-wlm munge shellcheck iproute2)

# A cached wheel of NAME==VERSION (wheel names may be lower-cased by pip), or nothing.
cached_wheel() { find "$WHEELS" -maxdepth 1 -iname "$1-$2-*.whl" 2>/dev/null | head -n1; }
say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- system packages
missing_apt=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing_apt+=("$p")
done
if ((${#missing_apt[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${missing_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null
  else
    # Not root: rely on the site's modules; check the commands we need, not Debian names.
    need=()
    for c in mpicc mpirun gdal-config cmake c++; do command -v "$c" >/dev/null || need+=("$c"); done
    if ((${#need[@]})); then
      die "missing commands: ${need[*]}. Load your site's modules (e.g. 'module load OpenMPI GDAL CMake GCC') or ask your admins; this script only calls apt-get as root."
    fi
    for c in sbatch srun; do command -v "$c" >/dev/null || say "note: '$c' not found; Slurm jobs cannot run, and \`make test\` fails its Slurm tests (plain pytest skips them)"; done
  fi
fi
# Checked on every run, also when the virtualenv is up to date: a machine whose PATH lost OpenMPI
# must not look ready (the demo and the MPI tests need these commands).
for c in mpirun mpicc gdal-config; do
  command -v "$c" >/dev/null || die "'$c' not found on PATH: OpenMPI or GDAL is missing or off PATH (Debian: openmpi-bin libopenmpi-dev gdal-bin libgdal-dev; a cluster: load the modules)"
done
GDAL_VERSION=$(gdal-config --version)

# ---------------------------------------------------------------- virtualenv
STAMP=$VENV/.hpcsrl-stamp
want_stamp=$( { echo "$TORCH_SPEC ${PY_PKGS[*]} gdal=$GDAL_VERSION horovod=$HOROVOD_VERSION";
                cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-16)
if [[ -f $STAMP && $(cat "$STAMP") == "$want_stamp" && -x $VENV/bin/python ]]; then
  say "virtualenv up to date ($VENV)"
  exit 0
fi

[[ -x $VENV/bin/python ]] || { say "creating virtualenv $VENV"; "$PY" -m venv "$VENV"; }
VPY=$VENV/bin/python
PIP=("$VPY" -m pip install -q --disable-pip-version-check)
mkdir -p "$WHEELS"

"$VPY" -c "import torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null \
  || { say "installing $TORCH_SPEC (CPU wheel)"; "${PIP[@]}" "$TORCH_SPEC"; }
say "installing Python packages"
"${PIP[@]}" "${PY_PKGS[@]}"

# GDAL bindings must match the system library and see numpy at build time.
if ! "$VPY" -c "from osgeo import gdal_array, gdal; assert gdal.__version__ == '$GDAL_VERSION'" 2>/dev/null; then
  whl=$(cached_wheel gdal "$GDAL_VERSION")
  if [[ -z $whl ]]; then
    say "building GDAL $GDAL_VERSION bindings (cached afterwards)"
    "$VPY" -m pip wheel -q --no-build-isolation --no-deps -w "$WHEELS" "GDAL==$GDAL_VERSION"
    whl=$(cached_wheel gdal "$GDAL_VERSION")
  fi
  "${PIP[@]}" --force-reinstall --no-deps "$whl"
fi

# Horovod 0.28.1: the sdist needs C++17 to compile against torch >= 2.1 (horovod#3996).
if ! "$VPY" -c "import horovod.torch" 2>/dev/null; then
  whl=$(cached_wheel horovod "$HOROVOD_VERSION")
  if [[ -z $whl ]]; then
    say "building Horovod $HOROVOD_VERSION with PyTorch + MPI (about 3 minutes, cached afterwards)"
    src=$(mktemp -d)
    "$VPY" -m pip download -q --no-deps --no-binary :all: -d "$src" "horovod==$HOROVOD_VERSION"
    tar -xzf "$src"/horovod-"$HOROVOD_VERSION".tar.gz -C "$src"
    hsrc=$src/horovod-$HOROVOD_VERSION
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$hsrc/CMakeLists.txt" "$hsrc/horovod/torch/CMakeLists.txt"
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
      HOROVOD_CPU_OPERATIONS=MPI MAKEFLAGS=-j"$(nproc)" \
      "$VPY" -m pip wheel -q --no-build-isolation --no-deps -w "$WHEELS" "$hsrc"
    rm -rf "$src"
    whl=$(cached_wheel horovod "$HOROVOD_VERSION")
  fi
  "${PIP[@]}" --no-deps "$whl"
fi

say "installing hpcsrl (editable)"
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"

"$VPY" - <<'EOF'
from osgeo import gdal, gdal_array  # noqa: F401
import h5py, mpi4py, torch, horovod.torch  # noqa: F401,E401
print(f"[install] torch {torch.__version__}, GDAL {gdal.__version__}, h5py {h5py.__version__}, "
      f"mpi4py {mpi4py.__version__}, horovod {horovod.__version__}")
EOF
echo "$want_stamp" > "$STAMP"
say "done"
