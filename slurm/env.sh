# shellcheck shell=bash
# Sourced (not run) by slurm/*.sbatch and slurm/tx2/*.sh: load modules, put the hpcsrl virtualenv
# on PATH, one compute thread per CPU the rank owns. Expects HPCSRL_HOME (the checkout) to be set.
#
#   HPCSRL_VENV     virtualenv to use (default: $HPCSRL_HOME/.venv when it exists; otherwise
#                   whatever is on PATH, e.g. an environment activated before `sbatch`)
#   HPCSRL_MODULES  environment modules to load first, space separated. Site names vary, e.g.
#                   HPCSRL_MODULES="GCC OpenMPI GDAL"  or  "Stages/2024 GCC ParaStationMPI GDAL"
#
# Exit code 3 for every environment problem, so a job log shows at once it never started work.

hpcsrl_die() {
  local code=$1
  shift
  printf 'hpcsrl: error: %s\n' "$*" >&2
  exit "$code"
}

if [[ -n ${HPCSRL_MODULES:-} ]]; then
  # `module` is a shell function from the site's profile; batch shells may not have read it.
  if ! type module >/dev/null 2>&1 && [[ -f /etc/profile.d/modules.sh ]]; then
    # shellcheck source=/dev/null  # the site's file, not part of this repository
    source /etc/profile.d/modules.sh
  fi
  type module >/dev/null 2>&1 \
    || hpcsrl_die 3 "HPCSRL_MODULES='$HPCSRL_MODULES' is set but the 'module' command is missing"
  # shellcheck disable=SC2086  # word splitting wanted: one module per word
  module load $HPCSRL_MODULES || hpcsrl_die 3 "'module load $HPCSRL_MODULES' failed"
fi

hpcsrl_venv=${HPCSRL_VENV:-$HPCSRL_HOME/.venv}
if [[ -x $hpcsrl_venv/bin/python ]]; then
  export VIRTUAL_ENV=$hpcsrl_venv
  export PATH="$hpcsrl_venv/bin:$PATH"
elif [[ -n ${HPCSRL_VENV:-} ]]; then
  hpcsrl_die 3 "HPCSRL_VENV=$HPCSRL_VENV is not a virtualenv (no bin/python); run scripts/install.sh"
fi

# Inside a Slurm job a rank owns --cpus-per-task CPUs; elsewhere (mpirun on TX2) one thread.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}

# hpcsrl_require CMD...: every command must be on PATH, else exit 3 naming it and the fix.
hpcsrl_require() {
  local cmd
  for cmd in "$@"; do
    command -v "$cmd" >/dev/null 2>&1 || hpcsrl_die 3 "'$cmd' not found on PATH (venv: \
$hpcsrl_venv). Run scripts/install.sh in $HPCSRL_HOME, or set HPCSRL_VENV / HPCSRL_MODULES."
  done
}

# hpcsrl_need_args MIN GIVEN SCRIPT: with fewer than MIN arguments print SCRIPT's help (its
# comment block between the shebang / #SBATCH lines and `set -e`) and exit 2.
hpcsrl_need_args() {
  (($2 >= $1)) && return 0
  sed -n '2,/^set -e/{/^#SBATCH/d;/^set -e/d;s/^# \{0,1\}//;p}' "$3" >&2
  exit 2
}
