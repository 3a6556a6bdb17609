#!/usr/bin/env bash
# Nightly regression of issue 8: a fixed training (and inference) workload compared with the
# stored baseline of this card; non-zero exit on a regression, so cron can run it.
#   scripts/nightly.sh [--gpu] [--update-baseline] [--baseline FILE] [--history PREFIX] [--out DIR]
#                      [--configs 1b,3b] [--steps N] [--accum 1b:4] [--time-tol 0.10] [--mem-tol 0.03] [--cpu]
# GPU: 1b and 3b at sequence 4096 (overlapped, plus shorter blocked / none runs where they fit),
# and 1b overlapped with grad_accum 4 (run 1b/overlapped-accum4; --accum SHAPE:K,... or none).
# Without a GPU: the same pipeline on the tiny config (accumulation run: tiny:2). A run that the
# baseline lacks is reported as new (no baseline yet), not as a regression. Baseline default:
# tests/regression/baselines/<card>.json. History: out/nightly/history.{md,jsonl} (appended).
# Exit: 0 pass, 1 regression (or a failed run), 2 usage error / no baseline yet.
# crontab (02:30 every night, build first, keep the log):
#   30 2 * * * cd /path/to/ferry && git pull -q && scripts/build.sh && scripts/nightly.sh --gpu >> out/nightly/cron.log 2>&1
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ferry_load_env
py="$(ferry_stdlib_python)"
[ -n "$py" ] || ferry_die "nightly.sh needs python3 (standard library only)"
export FERRY_BUILD_DIR
exec "$py" "$FERRY_ROOT/scripts/nightly/nightly.py" "$@"
