#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine, every node on a loopback address: a head
# (with the dashboard / job server on 127.0.0.1) plus N worker nodes, each its own raylet with
# its own node name, CPU count and a custom resource "node_<i>" so tests can pin work to a node.
#
#   cluster/local-cluster.sh [start] [N]   start a head and N workers (default 2); prints the
#                                          job server address for `rsk-dist submit --address`
#   cluster/local-cluster.sh stop          stop exactly the processes this script started
#   cluster/local-cluster.sh status        `ray status` of that cluster
#
# Settings (environment): RSK_CLUSTER_DIR (state, and Ray's temp dirs: one per node, $DIR/ray/<i>,
# so that each node's log monitor sends its own node's logs to the drivers, not all nodes' logs
# once per node; default /tmp/rsk-local-cluster, keep it short: Ray's socket paths must fit in
# 107 bytes),
# RSK_GCS_PORT (6390), RSK_DASHBOARD_PORT (8266), RSK_CLIENT_PORT (20011), RSK_AGENT_PORT (52400,
# node i's dashboard agent on +i), RSK_CPUS_PER_NODE (1), RSK_DASHBOARD (1; 0: no dashboard and
# no job server), RSK_NODE_IP (127.0.0.2: the address every node advertises), RAY (the ray CLI;
# default: the one on PATH; PYTHON: the python beside it). Token authentication is on unless
# RAY_AUTH_MODE=disabled: the token is RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH's file, else
# ~/.ray/auth_token, else one generated into $RSK_CLUSTER_DIR/auth_token (removed by `stop`).
#
# Loopback, through Ray's public interface only (`ray start`): in multi-node mode Ray replaces
# 127.0.0.1 and localhost by the machine's outward address, but not the other loopback addresses
# of 127.0.0.0/8, so every node advertises RSK_NODE_IP (127.0.0.2) and all traffic between the
# nodes stays on the loopback interface. As on any Linux Ray cluster, Ray's own servers listen
# on all interfaces: token authentication (on by default here) is what guards them. The
# dashboard / job server listens on 127.0.0.1 only.
#
# `stop` never runs `ray stop` (that stops every Ray on the machine, other users' included): it
# signals the process groups this script started (one session per node, their ids in
# $RSK_CLUSTER_DIR/pids), then any process left whose command line names this cluster's dir.
set -euo pipefail

DIR="${RSK_CLUSTER_DIR:-/tmp/rsk-local-cluster}"
GCS_PORT="${RSK_GCS_PORT:-6390}"
DASH_PORT="${RSK_DASHBOARD_PORT:-8266}"
CPUS="${RSK_CPUS_PER_NODE:-1}"
CLIENT_PORT="${RSK_CLIENT_PORT:-20011}"  # outside the worker port range 10002-19999
AGENT_PORT="${RSK_AGENT_PORT:-52400}"  # node i's dashboard agent listens on AGENT_PORT + i
RAY="${RAY:-$(command -v ray || echo ray)}"
PY="${PYTHON:-$(dirname "$RAY")/python}"
NODE_IP="${RSK_NODE_IP:-127.0.0.2}"
[[ -x "$PY" ]] || PY=python3
PIDS="$DIR/pids"

STARTING=0
die() {
  echo "local-cluster: $*" >&2
  if (( STARTING )); then
    for f in "$DIR"/*.log; do [[ -f "$f" ]] && { echo "--- $f (last lines)" >&2; tail -n 15 "$f" >&2; }; done
    cmd_stop >&2  # a half-started cluster is not left behind
  fi
  exit 1
}

start_node() {  # name, log file, ray start arguments...
  local name="$1" log="$2"; shift 2
  # setsid: each node in a session of its own, so `stop` can signal exactly it.
  setsid "$RAY" start --block --disable-usage-stats --node-ip-address="$NODE_IP" "$@" >"$log" 2>&1 < /dev/null &
  echo "$! $name" >> "$PIDS"
}

wait_for() {  # seconds, description, command...
  local seconds="$1" what="$2"; shift 2
  for _ in $(seq 1 "$seconds"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if ! alive; then die "a node exited while starting (logs in $DIR/*.log)"; fi
    sleep 1
  done
  die "$what did not come up in ${seconds}s (logs in $DIR/*.log)"
}

alive() {  # every node this script started still running
  local pid _
  while read -r pid _; do kill -0 "$pid" 2>/dev/null || return 1; done < "$PIDS"
}

started() {  # every node's `ray start` has printed that its node is up
  local f
  for f in "$@"; do grep -q "Ray runtime started" "$f" 2>/dev/null || return 1; done
}

setup_auth() {
  # Token authentication on unless RAY_AUTH_MODE=disabled, the same mode on every node (a head
  # turns it on by itself when ~/.ray/auth_token exists; a joining node does not).
  if [[ "${RAY_AUTH_MODE:-token}" == disabled ]]; then export RAY_AUTH_MODE=disabled; return; fi
  export RAY_AUTH_MODE=token
  if [[ -n "${RAY_AUTH_TOKEN:-}" || -n "${RAY_AUTH_TOKEN_PATH:-}" || -s "$HOME/.ray/auth_token" ]]; then
    return
  fi
  if [[ ! -s "$DIR/auth_token" ]]; then
    (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$DIR/auth_token")
  fi
  export RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
}

cmd_start() {
  local workers="${1:-2}"
  [[ "$workers" =~ ^[0-9]+$ ]] || die "N must be a number, got '$workers'"
  if [[ -s "$PIDS" ]]; then die "already running (state in $PIDS); run: $0 stop"; fi
  mkdir -p "$DIR"
  : > "$PIDS"
  STARTING=1
  export RAY_USAGE_STATS_ENABLED=0
  setup_auth
  local extra=() dashboard=1
  # The job server needs ray[default]; Ray Client needs grpcio. Without them: no such server.
  if [[ "${RSK_DASHBOARD:-1}" == 0 ]]; then
    dashboard=0
    extra+=(--include-dashboard=false)
  elif "$PY" -c 'import ray.dashboard.optional_deps' >/dev/null 2>&1; then
    extra+=(--include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT")
  else
    dashboard=0
    extra+=(--include-dashboard=false)
    echo "local-cluster: no Ray dashboard packages (pip install 'ray[default]'): no job server" >&2
  fi
  if "$PY" -c 'import grpc' >/dev/null 2>&1; then extra+=(--ray-client-server-port="$CLIENT_PORT"); fi
  start_node head "$DIR/head.log" \
    --head --node-name=head --port="$GCS_PORT" "${extra[@]}" \
    --dashboard-agent-listen-port="$AGENT_PORT" \
    --num-cpus="$CPUS" --resources='{"node_0": 1}' --temp-dir="$DIR/ray/0"
  wait_for 120 "the head node" started "$DIR/head.log"
  for i in $(seq 1 "$workers"); do  # one at a time: a node that waits too long for the GCS gives up
    start_node "worker$i" "$DIR/worker$i.log" \
      --address="$NODE_IP:$GCS_PORT" --node-name="worker$i" --num-cpus="$CPUS" \
      --resources="{\"node_$i\": 1}" --dashboard-agent-listen-port="$((AGENT_PORT + i))" \
      --temp-dir="$DIR/ray/$i"
    wait_for 120 "worker node $i" started "$DIR/worker$i.log"
  done
  STARTING=0
  echo "local Ray cluster up: head + $workers worker node(s), all on $NODE_IP"
  if (( dashboard )); then
    echo "  job server:   http://127.0.0.1:$DASH_PORT   (rsk-dist submit CONFIG --address http://127.0.0.1:$DASH_PORT)"
  fi
  echo "  GCS address:  $NODE_IP:$GCS_PORT           (rsk-dist train CONFIG --address $NODE_IP:$GCS_PORT)"
  if [[ "$RAY_AUTH_MODE" == token ]]; then
    echo "  token auth:   on; the token: ${RAY_AUTH_TOKEN:+\$RAY_AUTH_TOKEN}${RAY_AUTH_TOKEN:-${RAY_AUTH_TOKEN_PATH:-~/.ray/auth_token}}"
    echo "                (rsk-dist reads RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token for 127.0.0.1)"
  fi
  echo "  stop with:    $0 stop"
}

wait_gone() {  # seconds, pids...
  local seconds="$1" pid left; shift
  for _ in $(seq 1 "$seconds"); do
    left=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && left=1; done
    (( left )) || return 0
    sleep 1
  done
}

cmd_stop() {
  if [[ -f "$PIDS" ]]; then
    # SIGTERM to each node's `ray start --block` alone, the workers before the head: it drains
    # its node and stops its own processes (signalling a whole group at once makes the head
    # wait ~40 s for a GCS already gone). Whatever is left after that gets SIGKILL, by group.
    local pid name
    grep -v ' head$' "$PIDS" | while read -r pid _; do kill -TERM "$pid" 2>/dev/null || true; done
    wait_gone 30 $(grep -v ' head$' "$PIDS" | cut -d' ' -f1)
    grep ' head$' "$PIDS" | while read -r pid _; do kill -TERM "$pid" 2>/dev/null || true; done
    wait_gone 30 $(grep ' head$' "$PIDS" | cut -d' ' -f1)
    while read -r pid _; do kill -KILL -- "-$pid" 2>/dev/null || true; done < "$PIDS"
  fi
  # Processes that left their node's session (none normally): those naming this cluster's dir.
  for proc in /proc/[0-9]*; do
    local pid="${proc#/proc/}"
    [[ "$pid" == "$$" ]] && continue
    if { tr '\0' ' ' < "$proc/cmdline"; } 2>/dev/null | grep -qF -- "$DIR/ray"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$PIDS" "$DIR/auth_token"
  rm -rf "$DIR/ray"
  echo "local Ray cluster stopped"
}

cmd_status() {
  [[ -s "$PIDS" ]] || die "not running"
  setup_auth
  "$RAY" status --address="$NODE_IP:$GCS_PORT"
}

case "${1:-start}" in
  start) shift || true; cmd_start "${1:-2}" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  [0-9]*) cmd_start "$1" ;;
  -h|--help|help) sed -n '2,31p' "$0" ;;
  *) die "unknown command '$1' (start [N], stop, status)" ;;
esac
