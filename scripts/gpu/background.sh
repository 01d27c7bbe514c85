#!/usr/bin/env bash
# On the GPU machine: run a long job past the end of the call that started
# it (a call may run at most 10 minutes; the machine stays up while calls
# keep coming, and is given back about 30 s after the last one ends).
#
#   bash scripts/gpu/background.sh start NAME 'COMMAND ...'   # returns at once
#   bash scripts/gpu/background.sh poll [NAME]                # status and log tails
#   bash scripts/gpu/background.sh wait NAME [SECONDS]        # until done or SECONDS (default 540)
#
# Logs and exit codes go to $JOBS (default /tmp/jobs): NAME.log, NAME.rc.
# Poll again within 30 s of the previous call's end, or the machine (and
# the job) is gone.
set -euo pipefail
JOBS=${JOBS:-/tmp/jobs}
mkdir -p "$JOBS"
cmd=${1:-poll}
case $cmd in
  start)
    name=$2; shift 2
    rm -f "$JOBS/$name.rc"
    setsid nohup bash -c "$*; echo \$? > '$JOBS/$name.rc'" > "$JOBS/$name.log" 2>&1 < /dev/null &
    echo "$name started (pid $!)"
    ;;
  poll)
    for log in "$JOBS"/${2:-*}.log; do
      [[ -e $log ]] || { echo "no jobs"; exit 0; }
      name=$(basename "$log" .log)
      if [[ -e $JOBS/$name.rc ]]; then state="done, exit $(cat "$JOBS/$name.rc")"; else state=running; fi
      echo "== $name: $state"
      tail -n "${TAIL:-5}" "$log" | tr '\r' '\n' | tail -n "${TAIL:-5}"
    done
    ;;
  wait)
    name=$2; limit=${3:-540}; waited=0
    while [[ ! -e $JOBS/$name.rc && $waited -lt $limit ]]; do sleep 5; waited=$((waited + 5)); done
    "$0" poll "$name"
    ;;
  *)
    echo "usage: $0 start NAME 'COMMAND' | poll [NAME] | wait NAME [SECONDS]" >&2
    exit 2
    ;;
esac
