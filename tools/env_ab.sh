#!/usr/bin/env bash
# A/B of a setting read once per process (a kernel launcher's environment variable, e.g.
# $JAX_MOE_WEIGHT_EVICT_FIRST): one tools/kernel_times.py process per value and round, values
# alternated within each round so that drift hits them alike; every output line is prefixed
# with [VAR=value r=round].
#   ROUNDS=2 bash tools/env_ab.sh JAX_MOE_WEIGHT_EVICT_FIRST "off default" --tokens 1 16 --timeline
set -uo pipefail
cd "$(dirname "$0")/.."
var=$1 values=$2
shift 2
export PYTHONPATH="$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}"
for r in $(seq "${ROUNDS:-2}"); do
  for v in $values; do
    env "$var=$v" python tools/kernel_times.py --rounds 3 "$@" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" |
      sed "s/^/[$var=$v r=$r] /"
  done
done
