#!/bin/sh
# pi_node_verifier.sh: the runbook's node verifier, now `sugarkube-agent verify`.
# Installed under this name for operators and tooling that call it literally; the flags are the
# same (--json, --full, --log PATH, --log=PATH, --no-log, --help). --skip-compose[=BOOL] is
# accepted and ignored: the projects-compose check it toggled is no longer part of the verifier.
set -eu

n=$#
while [ "$n" -gt 0 ]; do
  arg=$1
  shift
  n=$((n - 1))
  case $arg in
    --skip-compose=*) ;;
    --skip-compose)
      if [ "$n" -gt 0 ]; then
        case $1 in
          --*) ;;
          *) shift; n=$((n - 1)) ;;
        esac
      fi
      ;;
    *) set -- "$@" "$arg" ;;
  esac
done

if command -v sugarkube-agent >/dev/null 2>&1; then
  exec sugarkube-agent verify "$@"
fi
exec /usr/bin/python3 -m agent verify "$@"
