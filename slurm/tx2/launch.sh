#!/usr/bin/env bash
# Start COMMAND as MPI ranks over the boards of a hostfile (Jetson TX2-class cluster, no Slurm).
#
#   slurm/tx2/launch.sh COMMAND [ARGS...]
#
# run_preprocess.sh and run_pretrain.sh call this; use it directly for anything else. Settings
# (environment variables):
#   HOSTFILE      OpenMPI hostfile (default: slurm/tx2/hostfile; see hostfile.example)
#   NP            number of ranks (default: the total of the hostfile's slots)
#   HPCSRL_IFACE  network interface the boards share, e.g. eth0 (default: OpenMPI chooses); also
#                 Horovod's Gloo interface (HOROVOD_GLOO_IFACE) unless that is set
#   HPCSRL_BTL    OpenMPI byte transfer layers (default: tcp,self; add vader for shared memory)
#   HPCSRL_MPIRUN_ARGS  extra mpirun options, e.g. "--prefix /opt/openmpi" or "--oversubscribe"
#   HPCSRL_VENV, HPCSRL_MODULES  see slurm/env.sh
# Every rank gets OMP_NUM_THREADS (default 1), PATH, LD_LIBRARY_PATH, VIRTUAL_ENV, PYTHONPATH and
# every HPCSRL_* / HOROVOD_* variable of this shell; ranks are not bound to cores.
# Exit codes: 2 usage / hostfile problem, 3 environment, otherwise mpirun's.
set -euo pipefail
HPCSRL_HOME=${HPCSRL_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source-path=SCRIPTDIR source=../env.sh  # the checkout's slurm/env.sh
source "$HPCSRL_HOME/slurm/env.sh"

hpcsrl_need_args 1 $# "${BASH_SOURCE[0]}"
hostfile=${HOSTFILE:-$HPCSRL_HOME/slurm/tx2/hostfile}
[[ -f $hostfile ]] || hpcsrl_die 2 "hostfile '$hostfile' not found: copy \
slurm/tx2/hostfile.example to slurm/tx2/hostfile and list your boards, or set HOSTFILE=FILE"
# Total slots: a host line without slots= counts as one, as OpenMPI counts it.
slots=$(awk '{sub(/#.*/, "")} NF {n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) \
  n = substr($i, 7) + 0; total += n} END {print total + 0}' "$hostfile")
np=${NP:-$slots}
[[ $np =~ ^[1-9][0-9]*$ ]] || hpcsrl_die 2 "no ranks to start: NP='${NP:-}', hostfile \
'$hostfile' has $slots slot(s); list hosts as 'NAME slots=N'"
hpcsrl_require mpirun

args=(--hostfile "$hostfile" -np "$np" --bind-to none --map-by slot
      --mca pml ob1 --mca btl "${HPCSRL_BTL:-tcp,self}")
if [[ -n ${HPCSRL_IFACE:-} ]]; then
  args+=(--mca btl_tcp_if_include "$HPCSRL_IFACE" --mca oob_tcp_if_include "$HPCSRL_IFACE")
  export HOROVOD_GLOO_IFACE=${HOROVOD_GLOO_IFACE:-$HPCSRL_IFACE}
fi
((EUID != 0)) || args+=(--allow-run-as-root)
for var in OMP_NUM_THREADS PATH LD_LIBRARY_PATH VIRTUAL_ENV PYTHONPATH \
           $(compgen -e | grep -E '^(HPCSRL|HOROVOD)_' || true); do
  [[ -z ${!var+x} ]] || args+=(-x "$var")
done
# shellcheck disable=SC2206  # extra options split on spaces on purpose
extra=(${HPCSRL_MPIRUN_ARGS:-})
# The remote daemons do not search our PATH: resolve the program here.
program=$(command -v "$1" || true)
[[ -n $program ]] || hpcsrl_die 3 "'$1' not found on PATH"
shift
echo "[hpcsrl] mpirun: $np rank(s) from $hostfile, $OMP_NUM_THREADS thread(s) each: $program $*" >&2
exec mpirun "${args[@]}" "${extra[@]}" "$program" "$@"
