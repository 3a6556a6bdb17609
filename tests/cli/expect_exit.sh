#!/usr/bin/env bash
# expect_exit.sh CODE PATTERN CMD... : passes when CMD exits with CODE and prints exactly one line
# on stderr that contains PATTERN.
set -u
want="$1"; pattern="$2"; shift 2
err="$("$@" 2>&1 >/dev/null)"
rc=$?
lines=$(printf '%s\n' "$err" | grep -c .)
if [ "$rc" != "$want" ]; then echo "exit code $rc, expected $want; stderr: $err"; exit 1; fi
if [ "$lines" != 1 ]; then echo "expected one line on stderr, got $lines: $err"; exit 1; fi
case "$err" in *"$pattern"*) exit 0 ;; esac
echo "stderr does not mention '$pattern': $err"; exit 1
