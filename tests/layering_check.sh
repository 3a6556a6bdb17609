#!/usr/bin/env bash
# The dependency direction of the source tree, checked on every #include of a project header:
#   cli -> train | infer -> checkpoint -> engine -> model -> gpu | cpu_optim
# with dist (ranks over c10d: implements the engine's collectives) below train and cli,
# with io (files and formats) beside them, usable from checkpoint upwards, and common everywhere.
# Prints each forbidden include as "file:line: folder must not include folder/..." and exits 1.
#   tests/layering_check.sh [ROOT]
set -uo pipefail
root="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cd "$root" || { echo "layering_check: no such directory $root"; exit 2; }

# folder -> the project folders its files may include (besides itself and common)
declare -A allowed=(
  [cpu_optim]=""
  [cpu_optim/bench]="src/engine"                    # a tool: --nvme measures the state tier on disk
  [gpu]=""
  [src/model]="gpu"
  [src/model/bench]="src/model src/io gpu"          # a tool: reads HF configs
  [src/io]="src/model"                              # the llama_config struct only
  [src/engine]="src/model gpu cpu_optim"
  [src/checkpoint]="src/engine src/model src/io"
  [src/dist]="src/engine"
  [src/train]="src/checkpoint src/dist src/engine src/model src/io"
  [src/infer]="src/checkpoint src/engine src/model src/io gpu"
  [src/cli]="src/train src/infer src/checkpoint src/dist src/engine src/model src/io"
)
folders=(src/common cpu_optim gpu src/model src/io src/engine src/dist src/checkpoint src/train src/infer src/cli)

bad=0 checked=0
while IFS= read -r -d '' f; do
  dir="$(dirname "$f")"
  # the most specific folder named in the table (gpu/bench counts as gpu, src/model/bench as itself)
  key="$dir"
  while [ -z "${allowed[$key]+x}" ] && [ "$key" != . ] && [ "$key" != src/common ]; do key="$(dirname "$key")"; done
  [ "$key" = . ] && continue
  [ "$key" = src/common ] && key=src/common
  while IFS=: read -r line inc; do
    checked=$((checked + 1))
    target=""
    for t in "${folders[@]}"; do
      case "$inc" in "$t"/*) target="$t" ;; esac
    done
    [ -z "$target" ] && continue
    [ "$target" = src/common ] && continue
    case "$key" in "$target"|"$target"/*) continue ;; esac
    if [ "$key" = src/common ] || [[ " ${allowed[$key]} " != *" $target "* ]]; then
      echo "$f:$line: $key must not include $inc (allowed: ${allowed[$key]:-nothing but common})"
      bad=$((bad + 1))
    fi
  done < <(grep -nE '^\s*#\s*include\s+"(src|gpu|cpu_optim)/' "$f" | sed -E 's/^([0-9]+):\s*#\s*include\s+"([^"]+)".*/\1:\2/')
done < <(find src gpu cpu_optim -type f \( -name '*.h' -o -name '*.cpp' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh' \) -print0)

if [ "$checked" = 0 ]; then echo "layering_check: found no project includes under $root (wrong root?)"; exit 2; fi
if [ "$bad" -gt 0 ]; then echo "layering_check: $bad forbidden includes of $checked"; exit 1; fi
echo "layering_check: $checked project includes follow cli -> train | infer -> checkpoint -> engine -> model -> gpu | cpu_optim"
