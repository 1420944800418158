#!/usr/bin/env bash
# The leak check of scripts/test.sh and scripts/demo.sh: whatever a run leaves behind of its own
# (processes, network namespaces and their /etc/netns files, mounts, files in its temporary
# directory) fails the run, named, and is then removed.
#
# Sourced:  leaks_begin LABEL    sets up a run (directory, cgroup, pid ledger)
#           leaks_run CMD...     runs CMD inside the run
#           leaks_end [FAILED]   reports and removes what is left; returns 1 if anything was.
#                                FAILED=1: CMD's tests failed, so files left are the logs they
#                                keep on purpose (reported as kept, not as leaks).
# Program:  leaks.sh record CMD...   cargo's runner for test binaries: records the pid, then execs.
#
# What is "ours", so that nothing of another run on the same machine is counted or touched:
# - processes: whatever is in the run's cgroup (cgroup v2, below the caller's own). Membership
#   follows every fork, uid change, PID namespace and reparenting, and nothing else joins it.
#   Without a writable cgroup v2: processes whose environment carries the run's TRELLIS_RUN_ID
#   (weaker: a test that clears its child's environment hides that child).
# - network namespaces and /etc/netns/NAME: a name starting with "tr" that contains the pid of one
#   of the run's test processes (tests put their pid in every namespace name). The runner records
#   each test process's pid and start time; a pid now held by a process started at another time
#   belongs to someone else.
# - files: whatever is left in the run's TMPDIR, /tmp/trellis-run-PID/tmp.
# - mounts: mount points under the run's directory or an /etc/netns/NAME of ours.

if [ "${1:-}" = record ] && [ "${BASH_SOURCE[0]}" = "$0" ]; then
  shift
  stat=$(</proc/$$/stat)
  read -ra fields <<<"${stat##*) }"
  # Field 22 (start time) counted from field 3, the first after the command name.
  echo "$$ ${fields[19]}" >>"$TRELLIS_RUN_DIR/pids"
  exec "$@"
fi

LEAKS_SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

# Start time of a process (clock ticks after boot), empty when it is gone.
leaks_start_time() {
  local stat fields
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  read -ra fields <<<"${stat##*) }"
  echo "${fields[19]}"
}

leaks_begin() {
  LEAKS_LABEL=$1
  LEAKS_DIR="/tmp/trellis-run-$$"
  LEAKS_ID="$LEAKS_LABEL-$$-$(date +%s%N)"
  LEAKS_DONE=""
  rm -rf --one-file-system "$LEAKS_DIR"
  mkdir -p "$LEAKS_DIR/tmp"
  # Envoy (uid 1337) and the apps read their files from here, as from /tmp.
  chmod 755 "$LEAKS_DIR"
  chmod 1777 "$LEAKS_DIR/tmp"
  : >"$LEAKS_DIR/pids"
  LEAKS_CG=""
  local mount path
  # `|| true`: callers run under set -e, and no cgroup v2 is a case to handle, not an error.
  mount=$(findmnt -n -o TARGET -t cgroup2 2>/dev/null | head -1 || true)
  path=$(sed -n 's/^0:://p' /proc/self/cgroup 2>/dev/null || true)
  if [ -n "$mount" ] && mkdir "$mount${path%/}/trellis-run-$$" 2>/dev/null; then
    LEAKS_CG="$mount${path%/}/trellis-run-$$"
  else
    echo "$LEAKS_LABEL: no writable cgroup v2 here: processes are told ours by TRELLIS_RUN_ID in their environment" >&2
  fi
  local triple
  triple=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p' || true)
  LEAKS_RUNNER_VAR="CARGO_TARGET_$(echo "${triple:-x86_64-unknown-linux-gnu}" | tr 'a-z-' 'A-Z_')_RUNNER"
}

leaks_run() {
  local env=(
    TMPDIR="$LEAKS_DIR/tmp"
    TRELLIS_RUN_DIR="$LEAKS_DIR"
    TRELLIS_RUN_ID="$LEAKS_ID"
    "$LEAKS_RUNNER_VAR=$LEAKS_SCRIPT record"
  )
  if [ -n "$LEAKS_CG" ]; then
    # shellcheck disable=SC2016 # $$ and $0 are the inner shell's.
    env "${env[@]}" bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$LEAKS_CG" "$@"
  else
    env "${env[@]}" "$@"
  fi
}

# Pids of the run's processes still running.
leaks_pids() {
  if [ -n "$LEAKS_CG" ]; then
    find "$LEAKS_CG" -name cgroup.procs -exec cat {} + 2>/dev/null
    return
  fi
  local dir pid
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    grep -qzx "TRELLIS_RUN_ID=$LEAKS_ID" "$dir/environ" 2>/dev/null || continue
    grep -q '^State:.*Z' "$dir/status" 2>/dev/null || echo "$pid"
  done
}

# True when network namespace (or /etc/netns entry) NAME is one of this run's.
leaks_ours() {
  local name=$1 token recorded
  [[ $name == tr* ]] || return 1
  for token in $(tr -c '0-9' ' ' <<<"$name"); do
    recorded=${LEAKS_PIDS[$token]:-}
    [ -n "$recorded" ] || continue
    local now
    now=$(leaks_start_time "$token")
    [ -z "$now" ] || [ "$now" = "$recorded" ] || continue
    return 0
  done
  return 1
}

leaks_end() {
  [ -z "${LEAKS_DONE:-}" ] || return 0
  LEAKS_DONE=1
  local failed=${1:-0} leaks=() kept=() pid pids name path mnt deadline
  # Processes. One that is ending (a test process's at-exit cleanup) gets 10 s.
  deadline=$((SECONDS + 10))
  while pids=$(leaks_pids) && [ -n "$pids" ] && [ $SECONDS -lt $deadline ]; do
    sleep 0.1
  done
  for pid in $pids; do
    leaks+=("process $pid (uid $(awk '/^Uid:/ {print $2}' "/proc/$pid/status" 2>/dev/null)): $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)")
  done
  if [ -n "$pids" ]; then
    if [ -n "$LEAKS_CG" ] && [ -e "$LEAKS_CG/cgroup.kill" ]; then
      echo 1 >"$LEAKS_CG/cgroup.kill"
    fi
    deadline=$((SECONDS + 10))
    while pids=$(leaks_pids) && [ -n "$pids" ] && [ $SECONDS -lt $deadline ]; do
      # shellcheck disable=SC2086 # one pid per word
      kill -KILL $pids 2>/dev/null
      sleep 0.1
    done
  fi
  if [ -n "$LEAKS_CG" ]; then
    find "$LEAKS_CG" -depth -type d -exec rmdir {} + 2>/dev/null
  fi

  # Network namespaces and their /etc/netns files, by the pids of the run's test processes.
  declare -gA LEAKS_PIDS=()
  local recorded_pid recorded_start
  while read -r recorded_pid recorded_start; do
    LEAKS_PIDS[$recorded_pid]=$recorded_start
  done <"$LEAKS_DIR/pids"
  for path in /var/run/netns/*; do
    [ -e "$path" ] || continue
    name=${path##*/}
    leaks_ours "$name" || continue
    leaks+=("network namespace $name")
    ip netns del "$name" 2>/dev/null || umount -l "$path" 2>/dev/null
    rm -f "$path"
  done
  # Mounts: under the run's directory, or an /etc/netns entry of ours (before any rm -rf).
  while read -r mnt; do
    mnt=$(printf '%b' "$mnt")
    case "$mnt" in
      "$LEAKS_DIR"/*) ;;
      /etc/netns/*) name=${mnt#/etc/netns/}; leaks_ours "${name%%/*}" || continue ;;
      *) continue ;;
    esac
    leaks+=("mount $mnt")
    umount -l "$mnt" 2>/dev/null
  done < <(awk '{print $5}' /proc/self/mountinfo | sort -r)
  for path in /etc/netns/*; do
    [ -e "$path" ] || continue
    name=${path##*/}
    leaks_ours "$name" || continue
    leaks+=("$path")
    rm -rf --one-file-system "$path"
  done

  # Files in the run's TMPDIR.
  for path in "$LEAKS_DIR"/tmp/* "$LEAKS_DIR"/tmp/.[!.]*; do
    [ -e "$path" ] || continue
    if [ "$failed" = 1 ]; then
      kept+=("$path")
    else
      leaks+=("file left in the temporary directory: $path ($(du -sh "$path" 2>/dev/null | cut -f1))")
      rm -rf --one-file-system "$path"
    fi
  done
  if [ ${#kept[@]} -eq 0 ]; then
    rm -rf --one-file-system "$LEAKS_DIR"
  else
    echo "$LEAKS_LABEL: kept for the failures above:"
    printf '  %s\n' "${kept[@]}"
  fi

  if [ ${#leaks[@]} -gt 0 ]; then
    echo "$LEAKS_LABEL: LEAK CHECK FAILED: this run left behind (now removed):" >&2
    printf '  %s\n' "${leaks[@]}" >&2
    return 1
  fi
  echo "$LEAKS_LABEL: leak check passed: no process, network namespace, mount or temporary file of this run is left"
}
