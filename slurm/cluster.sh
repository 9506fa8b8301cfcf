#!/usr/bin/env bash
# slurm/cluster.sh - a REAL Slurm 22.05 cluster (1 slurmctld + N slurmd "nodes") on ONE Debian 12 machine,
# for hpcinfer's tests, CI and users' sandboxes. Needs root; no systemd, no cgroups needed.
#
#   cluster.sh install          apt-get install munge slurmctld slurmd slurm-client
#                               (+ slurmdbd mariadb-server with HPCINFER_SLURM_ACCOUNTING=1), if missing
#   cluster.sh start            install if needed, then munged + slurmctld + N slurmd; waits until all nodes
#                               are IDLE and prints 'export SLURM_CONF=...' on stdout (logs go to stderr).
#                               Idempotent: if a cluster already runs under the base with all nodes
#                               responding, says so and exits 0 without touching it. An unhealthy one
#                               (a daemon dead, a node not responding) is stopped and started afresh.
#   cluster.sh stop             scancel all jobs, stop the daemons by PID, sweep leftover slurmstepd and
#                               their tasks, remove the /etc/hosts block and the base dir. No-op (exit 0)
#                               when nothing runs.
#   cluster.sh restart          stop, then start
#   cluster.sh status           daemon PIDs, sinfo, squeue. Exit 0 only when the cluster is up and all its
#                               nodes respond; 3 otherwise (tests use this to decide whether to start one)
#   cluster.sh env              print 'export SLURM_CONF=<base>/etc/slurm.conf':  eval "$(bash slurm/cluster.sh env)"
#   cluster.sh kill-node n3     SIGKILL n3's slurmd (fault injection; its slurmstepd/tasks keep running)
#   cluster.sh revive-node n3   restart n3's slurmd safely: drain, start, wait cred_expire+2 s, resume
#                               (a plain restart lets a requeued job start there at once and fail with
#                               "Job credential revoked")
#
# Everything lives under $HPCINFER_SLURM_BASE; nothing is written to /etc/slurm, clients find the cluster
# through SLURM_CONF. With HPCINFER_SLURM_ETC_HOSTS=1 the node names are added to /etc/hosts between marker
# lines (so `getent hosts n2` works in jobs); stop removes them. start/stop/restart/kill-node/revive-node
# serialize on the lock file $HPCINFER_SLURM_BASE.lock (kept; it is empty).
#
# Tunables (environment; start records them under the base, and the other commands use the recorded ones):
#   HPCINFER_SLURM_BASE=/tmp/hpcinfer-slurm  everything: config, munge key+socket, state, spool, logs, PIDs
#   HPCINFER_SLURM_NODES=4            slurmd "nodes" n1..nN (NodeAddr 127.0.100.i), 1..254
#   HPCINFER_SLURM_CPUS=2             CPUs per node as Slurm sees it (not checked against the hardware)
#   HPCINFER_SLURM_MEM_MB=4096        RealMemory per node (MB; not checked either)
#   HPCINFER_SLURM_CTLD_PORT=16917    slurmctld port
#   HPCINFER_SLURM_SLURMD_PORT0=17101 slurmd of node i listens on SLURMD_PORT0+i-1
#   HPCINFER_SLURM_DBD_PORT=16919     slurmdbd port (accounting only)
#   HPCINFER_SLURM_DB_PORT=13406      private MariaDB on 127.0.0.1 (accounting only)
#   HPCINFER_SLURM_SLURMD_TIMEOUT=6   SlurmdTimeout (s): a dead slurmd's node goes '*' after ~8-10 s, DOWN ~16 s
#   HPCINFER_SLURM_CRED_EXPIRE=10     cred_expire (s, >= 5): also the delay before a requeued job may restart
#   HPCINFER_SLURM_ACCOUNTING=0       1 = also slurmdbd + a private MariaDB so that sacct works (submitit
#                                     needs it to see jobs that died without a result)
#   HPCINFER_SLURM_UTS=1              each slurmd in its own UTS namespace, hostname = node name, so a task on
#                                     n2 sees `hostname` == n2 (0: all report the machine's hostname)
#   HPCINFER_SLURM_ETC_HOSTS=1        add 'n<i> -> 127.0.100.<i>' to /etc/hosts while the cluster runs
#   HPCINFER_SLURM_START_TIMEOUT=60   seconds start waits for all nodes to be IDLE
# Default ports keep clear of Slurm's usual 6817-6819 and of the 16817/17001../16819/13306 that similar CI
# scripts use, so such clusters can run side by side (each with its own base).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BASE="${HPCINFER_SLURM_BASE:-/tmp/hpcinfer-slurm}"
BASE="${BASE%/}"
if [[ $BASE != /?* || $BASE =~ [^A-Za-z0-9._/-] ]]; then
  echo "HPCINFER_SLURM_BASE must be an absolute path other than / (characters A-Za-z0-9._/- only), got '$BASE'" >&2
  exit 2
fi
# the properties of a cluster; start records them in $SETTINGS, the other commands read them back
CLUSTER_KEYS=(NODES CPUS MEM_MB CTLD_PORT SLURMD_PORT0 DBD_PORT DB_PORT SLURMD_TIMEOUT CRED_EXPIRE ACCOUNTING UTS ETC_HOSTS)
NODES="${HPCINFER_SLURM_NODES:-4}"
CPUS="${HPCINFER_SLURM_CPUS:-2}"
MEM_MB="${HPCINFER_SLURM_MEM_MB:-4096}"
CTLD_PORT="${HPCINFER_SLURM_CTLD_PORT:-16917}"
SLURMD_PORT0="${HPCINFER_SLURM_SLURMD_PORT0:-17101}"
DBD_PORT="${HPCINFER_SLURM_DBD_PORT:-16919}"
DB_PORT="${HPCINFER_SLURM_DB_PORT:-13406}"
SLURMD_TIMEOUT="${HPCINFER_SLURM_SLURMD_TIMEOUT:-6}"
CRED_EXPIRE="${HPCINFER_SLURM_CRED_EXPIRE:-10}"
ACCOUNTING="${HPCINFER_SLURM_ACCOUNTING:-0}"
UTS="${HPCINFER_SLURM_UTS:-1}"
ETC_HOSTS="${HPCINFER_SLURM_ETC_HOSTS:-1}"
START_TIMEOUT="${HPCINFER_SLURM_START_TIMEOUT:-60}"

CONF="$BASE/etc/slurm.conf"
SETTINGS="$BASE/etc/cluster.env"
SOCK="$BASE/munge/munge.socket"
LOCK="$BASE.lock"
HOSTS_BEGIN="# BEGIN hpcinfer-slurm $BASE"
HOSTS_END="# END hpcinfer-slurm $BASE"
export SLURM_CONF="$CONF"

T0N=$(date +%s%N)
log() { printf '[hpcinfer-slurm +%ss] %s\n' "$(awk -v a="$T0N" -v b="$(date +%s%N)" 'BEGIN{printf "%.2f", (b-a)/1e9}')" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
need_root() { [[ $(id -u) == 0 ]] || die "must be root"; }
node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "n$i"; done; }

validate() {
  local k v
  for k in "${CLUSTER_KEYS[@]}" START_TIMEOUT; do
    v=${!k}; [[ $v =~ ^[0-9]+$ ]] || die "HPCINFER_SLURM_$k must be a non-negative integer, got '$v'"
  done
  ((NODES >= 1 && NODES <= 254)) || die "HPCINFER_SLURM_NODES must be 1..254 (node i is 127.0.100.i)"
  ((CPUS >= 1 && MEM_MB >= 1)) || die "HPCINFER_SLURM_CPUS and HPCINFER_SLURM_MEM_MB must be >= 1"
  ((CRED_EXPIRE >= 5)) || die "HPCINFER_SLURM_CRED_EXPIRE must be >= 5 (Slurm's minimum)"
  for k in ACCOUNTING UTS ETC_HOSTS; do [[ ${!k} == [01] ]] || die "HPCINFER_SLURM_$k must be 0 or 1"; done
}

# settings of the cluster that runs under $BASE (written by start)
save_settings() { local k; for k in "${CLUSTER_KEYS[@]}"; do echo "$k=${!k}"; done >"$SETTINGS"; }
load_settings() { # override the variables with the running cluster's values, if it recorded them
  [[ -r $SETTINGS ]] || return 0
  local k v known
  while IFS='=' read -r k v; do
    known=0; [[ " ${CLUSTER_KEYS[*]} " == *" $k "* ]] && known=1
    ((known)) && [[ $v =~ ^[0-9]+$ ]] && printf -v "$k" '%s' "$v"
  done <"$SETTINGS"
  return 0
}
# settings the caller asked for explicitly (HPCINFER_SLURM_* set) that differ from the running cluster's
settings_conflicts() {
  [[ -r $SETTINGS ]] || return 0
  local k v envname
  while IFS='=' read -r k v; do
    envname="HPCINFER_SLURM_$k"
    [[ -n ${!envname:-} && ${!envname} != "$v" ]] && printf ' %s=%s (running: %s)' "$envname" "${!envname}" "$v"
  done <"$SETTINGS"
  return 0
}

take_lock() { mkdir -p "$(dirname "$BASE")"; exec 9>"$LOCK"; flock -w 900 9 || die "could not lock $LOCK"; }

cmd_install() {
  local pkgs=(munge slurmctld slurmd slurm-client)
  [[ $ACCOUNTING == 1 ]] && pkgs+=(slurmdbd mariadb-server)
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null && { [[ $ACCOUNTING != 1 ]] || { command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; }; }; then
    log "packages already installed: $(slurmd -V)"; return 0
  fi
  need_root
  # Debian's postinst would try to start munge/slurmd/slurmctld (and mariadb) via invoke-rc.d. Deny that if the
  # machine does not already do so (docker-style images ship /usr/sbin/policy-rc.d with 'exit 101').
  local added_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; added_policy=1
  fi
  local rc=0
  log "apt-get update"
  apt-get update -qq >&2 || rc=$?
  if ((rc == 0)); then
    log "apt-get install ${pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null || rc=$?
  fi
  if ((added_policy)); then rm -f /usr/sbin/policy-rc.d; fi
  ((rc == 0)) || die "apt-get failed (rc=$rc)"
  log "installed: $(slurmd -V), munge $(dpkg-query -W -f='${Version}' munge)"
}

render_conf() {
  local last=$((SLURMD_PORT0 + NODES - 1)) names addrs ports acct=none
  if ((NODES == 1)); then names="n1"; addrs="127.0.100.1"; ports="$SLURMD_PORT0"
  else names="n[1-$NODES]"; addrs="127.0.100.[1-$NODES]"; ports="[$SLURMD_PORT0-$last]"; fi
  [[ $ACCOUNTING == 1 ]] && acct=slurmdbd
  sed -e "s#@BASE@#$BASE#g" -e "s#@CTLD_PORT@#$CTLD_PORT#g" -e "s#@SLURMD_PORT@#$SLURMD_PORT0#g" \
      -e "s#@SLURMD_TIMEOUT@#$SLURMD_TIMEOUT#g" -e "s#@CRED_EXPIRE@#$CRED_EXPIRE#g" -e "s#@NNODES@#$NODES#g" \
      -e "s#@NODENAMES@#$names#g" -e "s#@NODEADDRS@#$addrs#g" -e "s#@NODEPORTS@#$ports#g" \
      -e "s#@CPUS@#$CPUS#g" -e "s#@MEM_MB@#$MEM_MB#g" -e "s#@DBD_PORT@#$DBD_PORT#g" \
      -e "s#@ACCT_STORAGE@#accounting_storage/$acct#g" \
      "$HERE/slurm.conf.template" >"$CONF"
  if grep -v "^#" "$CONF" | grep -q "@[A-Z_]*@"; then die "unrendered placeholder in $CONF"; fi
}

etc_hosts_add() {
  [[ $ETC_HOSTS == 1 ]] || return 0
  etc_hosts_remove
  # /etc/hosts may lack a trailing newline; appending blindly would glue our first line onto its last
  [[ -z $(tail -c1 /etc/hosts) ]] || echo >>/etc/hosts
  { echo "$HOSTS_BEGIN"; local i; for ((i = 1; i <= NODES; i++)); do echo "127.0.100.$i n$i"; done
    echo "$HOSTS_END"; } >>/etc/hosts
}
etc_hosts_remove() {
  grep -qF -- "$HOSTS_BEGIN" /etc/hosts 2>/dev/null || return 0
  # edit in place (keep the inode: /etc/hosts may be a bind mount)
  local tmp; tmp=$(mktemp)
  awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0==b{skip=1;next} $0==e{skip=0;next} !skip' /etc/hosts >"$tmp"
  cat "$tmp" >/etc/hosts; rm -f "$tmp"
}

wait_for() { # wait_for <timeout-s> <description> <command...>
  local t=$1 what=$2; shift 2
  local deadline=$(( $(date +%s%N) + t * 1000000000 ))
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s%N) < deadline )) || die "timeout (${t}s) waiting for $what"
    sleep 0.1
  done
}

# run a daemon detached from our stdio (so `x=$(cluster.sh start)` or a captured subprocess does not wait for
# the daemon to close the pipe) and without our lock fd; its early stdout/stderr go to <base>/log/<name>.out
daemon() { local name=$1; shift; "$@" </dev/null >>"$BASE/log/$name.out" 2>&1 9>&-; }

pid_of() { if [[ -s $1 ]]; then cat "$1"; fi; }
# a PID is alive if it exists and is not a zombie (a killed daemon stays a zombie until PID 1 reaps it)
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null && [[ $(ps -o stat= -p "$1" 2>/dev/null) != Z* ]]; }

all_idle() {
  local out; out=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  [[ $(grep -c ' idle$' <<<"$out") == "$NODES" ]]
}

# health: prints what is wrong (empty = healthy); needs the recorded settings loaded
unhealthy_reason() {
  [[ -r $SETTINGS ]] || { echo "no cluster under $BASE"; return; }
  alive "$(pid_of "$BASE/munge/munged.pid")" || { echo "munged not running"; return; }
  alive "$(pid_of "$BASE/run/slurmctld.pid")" || { echo "slurmctld not running"; return; }
  if [[ $ACCOUNTING == 1 ]]; then
    alive "$(pid_of "$BASE/run/slurmdbd.pid")" || { echo "slurmdbd not running"; return; }
    alive "$(pid_of "$BASE/db/mysqld.pid")" || { echo "mariadbd not running"; return; }
  fi
  local n dead=()
  for n in $(node_names); do alive "$(pid_of "$BASE/run/slurmd-$n.pid")" || dead+=("$n"); done
  ((${#dead[@]} == 0)) || { echo "slurmd not running for ${dead[*]}"; return; }
  local out; out=$(sinfo -h -N -o '%N %T' 2>/dev/null) || { echo "sinfo failed (slurmctld not answering)"; return; }
  local count bad
  count=$(awk 'NF' <<<"$out" | wc -l)
  bad=$(awk '$2 ~ /[*]/ || $2 ~ /^(down|fail|unk|inval|future|not_resp)/ {printf "%s(%s) ", $1, $2}' <<<"$out")
  ((count == NODES)) || { echo "sinfo lists $count nodes, expected $NODES"; return; }
  [[ -z $bad ]] || { echo "nodes not responding: ${bad% }"; return; }
}

on_start_exit() {
  local rc=$?
  ((rc == 0)) && return 0
  log "start FAILED (rc=$rc); logs copied to $BASE.failed-logs"
  rm -rf "$BASE.failed-logs"; cp -r "$BASE/log" "$BASE.failed-logs" 2>/dev/null || true
  tail -n 5 "$BASE"/log/*.log "$BASE"/log/*.out >&2 2>/dev/null || true
  set +e; cmd_stop
}

start_accounting() {
  local db="$BASE/db"
  mkdir -p "$db"
  log "MariaDB: mariadb-install-db into $db/data"
  mariadb-install-db --no-defaults --datadir="$db/data" --user=root --auth-root-authentication-method=normal \
    --skip-test-db </dev/null >"$BASE/log/mariadb-install.log" 2>&1 9>&-
  log "MariaDB: mariadbd on 127.0.0.1:$DB_PORT"
  # setsid + nohup: fully detached, PID taken from its own --pid-file
  setsid nohup mariadbd --no-defaults --datadir="$db/data" --user=root --socket="$db/mysqld.sock" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$db/mysqld.pid" --log-error="$BASE/log/mariadbd.log" \
    --innodb-buffer-pool-size=64M --skip-log-bin --innodb-flush-log-at-trx-commit=0 \
    </dev/null >/dev/null 2>&1 9>&- &
  wait_for 30 "mariadbd" mariadb --no-defaults -S "$db/mysqld.sock" -uroot -e "select 1"
  sed -e "s#@BASE@#$BASE#g" -e "s#@DBD_PORT@#$DBD_PORT#g" -e "s#@DB_PORT@#$DB_PORT#g" \
    "$HERE/slurmdbd.conf.template" >"$BASE/etc/slurmdbd.conf"
  chmod 600 "$BASE/etc/slurmdbd.conf"
  log "slurmdbd on port $DBD_PORT (reads $BASE/etc/slurmdbd.conf: same dir as SLURM_CONF)"
  daemon slurmdbd slurmdbd
  wait_for 30 "slurmdbd" bash -c "sacctmgr -n show cluster format=cluster >/dev/null"
}

start_slurmd() { # start_slurmd <node>: daemonizes; PID in $BASE/run/slurmd-<node>.pid
  local n=$1
  if [[ $UTS == 1 ]]; then
    # shellcheck disable=SC2016  # $1/$2 are expanded by that sh, not by us
    daemon "slurmd-$n" unshare --uts sh -c 'hostname "$1" && exec slurmd -f "$2" -N "$1"' sh "$n" "$CONF"
  else
    daemon "slurmd-$n" slurmd -f "$CONF" -N "$n"
  fi
}

check_ports_free() { # fail fast (instead of a 20 s timeout) when a port we need is taken, e.g. by another cluster
  command -v ss >/dev/null || return 0
  local want=("$CTLD_PORT") i busy=() p
  for ((i = 0; i < NODES; i++)); do want+=($((SLURMD_PORT0 + i))); done
  if [[ $ACCOUNTING == 1 ]]; then want+=("$DBD_PORT" "$DB_PORT"); fi
  local listening; listening=" $(ss -Hltn 2>/dev/null | awk '{n=split($4,a,":"); print a[n]}' | sort -u | tr '\n' ' ') "
  for p in "${want[@]}"; do [[ $listening == *" $p "* ]] && busy+=("$p"); done
  ((${#busy[@]} == 0)) || die "port(s) already in use: ${busy[*]} (another cluster? set HPCINFER_SLURM_*_PORT*)"
}

cmd_start() {
  need_root
  if [[ -d $BASE ]]; then
    # a cluster (or what is left of one) exists under the base: judge it by its recorded settings
    local conflicts reason
    conflicts=$(settings_conflicts)
    reason=$(load_settings; unhealthy_reason)
    if [[ -z $reason && -n $conflicts ]]; then
      die "a cluster with other settings runs under $BASE:$conflicts; use 'restart' (or 'stop' first)"
    fi
    if [[ -z $reason ]]; then
      (load_settings; log "cluster already running under $BASE, all $NODES nodes responding: nothing to do")
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    log "cluster under $BASE is not healthy ($reason): stopping it, then starting afresh"
    (load_settings; cmd_stop)
  fi
  validate
  cmd_install
  check_ports_free
  rm -rf "$BASE"
  mkdir -p "$BASE"/{etc,log,run,state,munge}
  trap on_start_exit EXIT
  local n; for n in $(node_names); do mkdir -p "$BASE/spool/$n"; done
  chmod 755 "$BASE" "$BASE/munge"   # munged insists the socket dir is world-executable
  save_settings

  log "munged (own key, own socket $SOCK)"
  dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$BASE/munge/munge.key"
  daemon munged munged --key-file="$BASE/munge/munge.key" --socket="$SOCK" --pid-file="$BASE/munge/munged.pid" \
         --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/munged.seed"
  wait_for 10 "munged" munge -n -S "$SOCK"

  render_conf
  if [[ $ACCOUNTING == 1 ]]; then start_accounting; fi
  log "slurmctld on port $CTLD_PORT (conf $CONF)"
  daemon slurmctld slurmctld -i -f "$CONF"
  wait_for 20 "slurmctld" bash -c 'scontrol ping | grep -q "is UP"'

  log "slurmd x$NODES (ports $SLURMD_PORT0..$((SLURMD_PORT0 + NODES - 1)), UTS=$UTS)"
  for n in $(node_names); do start_slurmd "$n"; done
  etc_hosts_add
  wait_for "$START_TIMEOUT" "all $NODES nodes IDLE" all_idle
  trap - EXIT
  log "cluster up: $(sinfo -h -o '%P %D nodes %T %N')"
  echo "export SLURM_CONF=$CONF"
}

# slurmstepd processes started by *our* slurmd: their cwd or an open fd points into $BASE
our_stepds() {
  local p fd
  for p in $(pgrep -x slurmstepd || true); do
    if [[ $(readlink "/proc/$p/cwd" 2>/dev/null) == "$BASE"/* ]]; then echo "$p"; continue; fi
    for fd in /proc/"$p"/fd/*; do
      if [[ $(readlink "$fd" 2>/dev/null) == "$BASE"/* ]]; then echo "$p"; break; fi
    done
  done
}

kill_and_wait() { # kill_and_wait <sig> <pids...>: signal, then wait up to 10 s for them to go
  local sig=$1; shift; local p alive_any
  [[ $# -gt 0 ]] || return 0
  kill "-$sig" "$@" 2>/dev/null || true
  for _ in $(seq 100); do
    alive_any=0; for p in "$@"; do alive "$p" && alive_any=1; done
    ((alive_any)) || return 0; sleep 0.1
  done
  return 1
}

cmd_stop() {
  if [[ ! -d $BASE ]]; then log "nothing runs under $BASE"; etc_hosts_remove; return 0; fi
  local ctld f p; ctld=$(pid_of "$BASE/run/slurmctld.pid")
  if alive "$ctld"; then
    # wait up to 10 s for the cancelled jobs to end; 1 s if a slurmd is dead (its jobs stay COMPLETING
    # until the slurmstepd sweep below anyway)
    local tries=50
    for f in "$BASE"/run/slurmd-*.pid; do [[ -e $f ]] && ! alive "$(pid_of "$f")" && tries=5; done
    log "scancel all jobs"
    scancel --partition=debug 2>/dev/null || true
    for _ in $(seq "$tries"); do [[ -z $(squeue -h -t R,CG 2>/dev/null) ]] && break; sleep 0.2; done
  fi
  # SIGTERM all slurmd + slurmctld together (each takes ~1-2 s to exit), then the services they used
  local daemons=()
  for f in "$BASE"/run/slurmd-*.pid; do
    p=$(pid_of "$f"); if alive "$p"; then daemons+=("$p"); fi
  done
  if alive "$ctld"; then daemons+=("$ctld"); fi
  log "stop slurmd/slurmctld PIDs: ${daemons[*]:-none}"
  if ((${#daemons[@]})); then
    kill_and_wait TERM "${daemons[@]}" || kill_and_wait KILL "${daemons[@]}" || true
  fi
  local services=()
  for p in "$(pid_of "$BASE/run/slurmdbd.pid")" "$(pid_of "$BASE/db/mysqld.pid")"; do
    if alive "$p"; then services+=("$p"); fi
  done
  if ((${#services[@]})); then
    log "stop slurmdbd/mariadbd PIDs: ${services[*]}"
    kill_and_wait TERM "${services[@]}" || kill_and_wait KILL "${services[@]}" || true
  fi
  # leftovers: slurmstepd (and the tasks in their sessions) whose slurmd was killed
  local stepds=() s q sid victims=()
  mapfile -t stepds < <(our_stepds)
  for s in "${stepds[@]}"; do
    victims+=("$s")
    sid=$(ps -o sid= -p "$s" 2>/dev/null | tr -d ' ') || true
    [[ -n $sid ]] || continue
    for q in $(ps -e -o pid=,sid= | awk -v sid="$sid" '$2==sid{print $1}'); do victims+=("$q"); done
  done
  if ((${#victims[@]})); then
    mapfile -t victims < <(printf '%s\n' "${victims[@]}" | sort -un)
    log "sweep leftover slurmstepd/task PIDs: ${victims[*]}"
    kill_and_wait KILL "${victims[@]}" || true
  fi
  local mpid; mpid=$(pid_of "$BASE/munge/munged.pid")
  if alive "$mpid"; then
    log "stop munged PID $mpid"; kill_and_wait TERM "$mpid" || kill_and_wait KILL "$mpid" || true
  fi
  etc_hosts_remove
  rm -rf "$BASE"
  log "stopped; $BASE removed"
}

cmd_status() {
  echo "SLURM_CONF=$CONF"
  if [[ ! -d $BASE ]]; then echo "no cluster under $BASE"; return 3; fi
  [[ -r $SETTINGS ]] && echo "settings: $(tr '\n' ' ' <"$SETTINGS")"
  local f p
  for f in "$BASE"/munge/munged.pid "$BASE"/db/mysqld.pid "$BASE"/run/*.pid; do
    [[ -e $f ]] || continue; p=$(pid_of "$f")
    printf '%-44s %-8s %s\n' "$f" "$p" "$(alive "$p" && echo alive || echo DEAD)"
  done
  if alive "$(pid_of "$BASE/run/slurmctld.pid")"; then
    sinfo -N -o '%N %P %T %c %m %E' || true
    squeue || true
  fi
  local reason; reason=$(unhealthy_reason)
  if [[ -n $reason ]]; then echo "status: NOT OK ($reason)"; return 3; fi
  echo "status: OK ($NODES nodes responding)"
}

check_node() { # check_node <name>: one of n1..nN
  local n=${1:-}
  [[ $n =~ ^n([1-9][0-9]*)$ ]] && ((BASH_REMATCH[1] <= NODES)) \
    || die "node must be one of n1..n$NODES, got '${n}'"
  [[ -r $SETTINGS ]] || die "no cluster under $BASE"
}

# kill-node <n>: SIGKILL that node's slurmd (fault injection; its slurmstepd/tasks keep running)
cmd_kill_node() {
  local n=${1:-}; check_node "$n"
  local p; p=$(pid_of "$BASE/run/slurmd-$n.pid")
  alive "$p" || die "no live slurmd for $n"
  kill -KILL "$p"; log "killed slurmd $n (PID $p)"
}

# revive-node <n>: restart a node's slurmd. The node is drained first and resumed only after cred_expire+2 s:
# otherwise a job requeued off this node can be started on it at once and fail with "Job credential revoked".
cmd_revive_node() {
  local n=${1:-}; check_node "$n"
  if alive "$(pid_of "$BASE/run/slurmd-$n.pid")"; then
    log "slurmd of $n is running (PID $(pid_of "$BASE/run/slurmd-$n.pid")): nothing to revive"; return 0
  fi
  scontrol update nodename="$n" state=drain reason=hpcinfer-revive 2>/dev/null || true
  start_slurmd "$n"
  wait_for 20 "$n registered" bash -c "sinfo -h -n $n -o %T | grep -qv '[*]'"
  log "$n registered ($(sinfo -h -n "$n" -o %T)); waiting cred_expire+2 = $((CRED_EXPIRE + 2)) s before resuming"
  sleep $((CRED_EXPIRE + 2))
  scontrol update nodename="$n" state=resume
  wait_for 20 "$n responding after resume" bash -c "sinfo -h -n $n -o %T | grep -qv '[*]'"
  log "revived $n: $(sinfo -h -n "$n" -o %T)"
}

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2; }

case "${1:-}" in
  install) validate; cmd_install ;;
  start) take_lock; cmd_start ;;
  stop) take_lock; load_settings; cmd_stop ;;
  restart) take_lock; (load_settings; cmd_stop); cmd_start ;;
  status) load_settings; cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  kill-node) take_lock; load_settings; cmd_kill_node "${2:-}" ;;
  revive-node) take_lock; load_settings; cmd_revive_node "${2:-}" ;;
  -h|--help|help) usage ;;
  *) usage; exit 2 ;;
esac
