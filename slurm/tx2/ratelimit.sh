#!/usr/bin/env bash
# Run a command (typically `mpirun ...`) with its ranks talking over a rate-limited link, to
# emulate the slow Ethernet between TX2-class boards on one machine.
#
#   slurm/tx2/ratelimit.sh --rate 100mbit [--delay 5ms] [--burst 32kbit] -- mpirun -np 6 ...
#
# How: a private network namespace whose loopback carries a `tc tbf` (token bucket) rate limit,
# optionally a `netem` delay; OpenMPI is told to use TCP over that loopback only (no shared
# memory), so every message between ranks crosses the limited link. The namespace is deleted
# on exit, also after Ctrl-C or a failing command. Needs root (or CAP_NET_ADMIN).
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
die() { printf 'ratelimit.sh: %s\n' "$*" >&2; exit 2; }

rate="" delay="" burst="" name="hpcsrl_link_$$"
while (($#)); do
  case $1 in
    --rate) rate=${2:?--rate needs a value such as 100mbit}; shift 2 ;;
    --delay) delay=${2:?--delay needs a value such as 5ms}; shift 2 ;;
    --burst) burst=${2:?--burst needs a value such as 32kbit}; shift 2 ;;
    --name) name=${2:?--name needs a value}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
(($#)) || die "no command given: ratelimit.sh --rate 100mbit -- mpirun ... (see --help)"
[[ -n $rate ]] || die "--rate is required (e.g. 1gbit, 100mbit, 10mbit)"
[[ $rate =~ ^([0-9]+)(kbit|mbit|gbit)$ ]] || die "--rate '$rate': expected a number with kbit, mbit or gbit (e.g. 100mbit)"
if [[ -z $burst ]]; then
  # The bucket must hold 10 ms of traffic (timer granularity) and at least a few frames.
  case ${BASH_REMATCH[2]} in kbit) scale=1 ;; mbit) scale=1000 ;; gbit) scale=1000000 ;; esac
  kbit=$((BASH_REMATCH[1] * scale / 100))
  burst="$((kbit > 64 ? kbit : 64))kbit"
fi
for c in ip tc; do
  command -v "$c" >/dev/null || die "'$c' not found: install iproute2"
done

cleanup() { ip netns del "$name" 2>/dev/null || true; }
if ! ip netns add "$name" 2>/dev/null; then
  die "cannot create a network namespace here (needs root or CAP_NET_ADMIN, and a kernel/container that allows 'ip netns add'); run without rate limiting or on a machine that allows it"
fi
trap cleanup EXIT INT TERM
# An Ethernet-sized MTU: loopback's 64 KiB frames would never fit a small token bucket.
ip netns exec "$name" ip link set lo mtu 1500 up
if [[ -n $delay ]]; then
  # netem (delay) as the root qdisc, the token bucket below it.
  ip netns exec "$name" tc qdisc add dev lo root handle 1: netem delay "$delay" 2>/dev/null \
    || die "--delay needs the 'netem' qdisc (kernel module sch_netem), which this machine lacks; use --rate alone"
  ip netns exec "$name" tc qdisc add dev lo parent 1: handle 2: tbf rate "$rate" burst "$burst" latency 50ms \
    || die "tc rejected --rate $rate / --burst $burst"
else
  ip netns exec "$name" tc qdisc add dev lo root tbf rate "$rate" burst "$burst" latency 50ms \
    || die "tc rejected --rate $rate / --burst $burst"
fi
printf 'ratelimit.sh: namespace %s, loopback limited to %s (burst %s)%s\n' "$name" "$rate" "$burst" \
  "${delay:+, delay $delay}" >&2
# OpenMPI inside the namespace: TCP over the limited loopback only, no shared-memory transport.
export OMPI_MCA_btl=tcp,self OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
ip netns exec "$name" "$@"
