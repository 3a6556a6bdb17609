#!/usr/bin/env bash
# expect_output.sh RC REGEX -- CMD... : runs CMD, prints its output (stdout and stderr together),
# and passes when CMD exits with RC and the output matches the POSIX extended regular expression
# REGEX ('.' matches newlines too). ctest's PASS_REGULAR_EXPRESSION alone ignores the exit code, so
# a tool that printed the expected text and then failed would pass.
# Exit 77 from CMD is passed on as 77 (skipped where the test sets SKIP_RETURN_CODE 77, a failure
# elsewhere), and only when RC is not 77; any other mismatch exits 1 with one line saying why.
set -u
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: expect_output.sh RC REGEX -- CMD..." >&2
  exit 2
fi
want="$1" regex="$2"
shift 3
out="$("$@" 2>&1)"
rc=$?
printf '%s\n' "$out"
if [ "$rc" != "$want" ]; then
  [ "$rc" = 77 ] && { echo "expect_output: skipped (exit 77): $1"; exit 77; }
  echo "expect_output: exit code $rc, expected $want: $*"
  exit 1
fi
if ! [[ $out =~ $regex ]]; then
  echo "expect_output: exit code $rc as expected, but the output does not match /${regex//$'\n'/\\n}/"
  exit 1
fi
