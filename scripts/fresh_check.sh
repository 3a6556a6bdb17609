#!/usr/bin/env bash
# The README's commands on a machine that has nothing installed by hand: a minimal Debian 12 root
# made with debootstrap, the committed tree copied in with git archive, then, inside it as root,
# `scripts/train.sh` (set up, build everything including the test suite, train the embedded
# default for a few steps) and a check that the checkpoint it wrote loads and that the test
# suite's binaries run. A package that only a developer's machine has cannot hide here.
#
#   scripts/fresh_check.sh [--ref REF] [--steps N] [--dir DIR] [--keep] [--timeout SEC]
#
#   --ref REF      what to check (default HEAD); an older commit shows what it would have done
#   --steps N      training steps inside the root (default 3)
#   --dir DIR      where the root is made (default /var/tmp); it is removed afterwards unless --keep
#   --timeout SEC  limit for everything inside the root (default 1800)
#
# The root reaches the package registries the way this machine does: the Debian mirror is read
# from this machine's apt sources at run time, and its pip configuration, local CA certificates,
# apt Acquire settings and proxy variables are copied in. FERRY_PIP_CACHE_DIR, when set, is shared
# with the root so the PyTorch wheel is downloaded once per machine, not once per check.
# Needs root (debootstrap, chroot, mounts). Exit 0 when every step passed, 1 otherwise, 2 on bad usage.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ref=HEAD steps=3 base=/var/tmp keep=0 limit=1800 suite=bookworm
while [ $# -gt 0 ]; do
  case "$1" in
    --ref) ref="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --dir) base="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --timeout) limit="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) ferry_die "fresh_check.sh: unknown argument '$1' (valid: --ref REF, --steps N, --dir DIR, --keep, --timeout SEC)" 2 ;;
  esac
done
[[ "$steps" =~ ^[1-9][0-9]*$ ]] || ferry_die "fresh_check.sh: --steps must be a positive integer, got '$steps'" 2
[[ "$limit" =~ ^[1-9][0-9]*$ ]] || ferry_die "fresh_check.sh: --timeout must be a positive number of seconds, got '$limit'" 2
[ "$(id -u)" = 0 ] || ferry_die "fresh_check.sh needs root (debootstrap, chroot and mounts)" 2
git -C "$FERRY_ROOT" rev-parse --verify -q "$ref^{commit}" >/dev/null \
  || ferry_die "fresh_check.sh: --ref '$ref' is not a commit of $FERRY_ROOT" 2
commit=$(git -C "$FERRY_ROOT" rev-parse --short=12 "$ref^{commit}")

t_start=$(date +%s)
phase() { ferry_log "fresh_check: $* ($(( $(date +%s) - t_start )) s)"; }

if ! command -v debootstrap >/dev/null; then
  phase "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; } \
    || ferry_die "fresh_check.sh: cannot install debootstrap with apt-get"
fi

# The first Debian archive among this machine's apt sources (deb822 .sources or one-line lists).
debian_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    awk 'BEGIN{RS=""} /Suites:[^\n]*(bookworm|stable)( |\n|$)/ && !/-security/ {
           if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { u = substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", u); print u; exit } }' "$f"
  done
  { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } |
    awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }'
}
mirror=$(debian_mirror | head -1 || true)
[ -n "$mirror" ] || ferry_die "fresh_check.sh: found no Debian archive in /etc/apt/sources.list{,.d}; this check needs a Debian machine with apt"

mkdir -p "$base"
root=$(mktemp -d "$base/ferry-fresh.XXXXXX")
mounted=()
cleanup() {
  local m
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
  if [ "$keep" = 1 ]; then
    ferry_log "fresh_check: root kept at $root"
  else
    # Nothing may still be mounted below the root before it is removed.
    if grep -q " $root/" /proc/mounts; then
      ferry_log "fresh_check: mounts remain under $root; not removing it"
    else
      rm -rf --one-file-system "$root"
    fi
  fi
}
trap cleanup EXIT
mount_in() {  # mount_in TYPE-OR-bind SOURCE TARGET
  mkdir -p "$root$3"
  if [ "$1" = bind ]; then mount --bind "$2" "$root$3"; else mount -t "$1" "$2" "$root$3"; fi
  mounted+=("$root$3")
}

phase "debootstrap $suite (minbase) from $mirror into $root"
debootstrap --variant=minbase --include=ca-certificates "$suite" "$root" "$mirror" > "$root.debootstrap.log" 2>&1 \
  || { tail -20 "$root.debootstrap.log" >&2; ferry_die "fresh_check.sh: debootstrap failed (log above)"; }
rm -f "$root.debootstrap.log"

# What makes this machine reach the registries, and nothing else of it.
cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
for f in /etc/pip.conf /root/.config/pip/pip.conf /root/.pip/pip.conf; do
  if [ -f "$f" ]; then mkdir -p "$root$(dirname "$f")"; cp "$f" "$root$f"; fi
done
if ls /usr/local/share/ca-certificates/* >/dev/null 2>&1; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi
for f in /etc/apt/apt.conf.d/*; do
  [ -f "$f" ] && grep -q '^[^/]*Acquire::' "$f" && cp "$f" "$root/etc/apt/apt.conf.d/"
done

mount_in proc proc /proc
mount_in sysfs sys /sys
mount_in bind /dev /dev
mount_in devpts devpts /dev/pts
mount_in tmpfs tmpfs /dev/shm
if [ -n "${FERRY_PIP_CACHE_DIR:-}" ]; then
  mkdir -p "$FERRY_PIP_CACHE_DIR"
  mount_in bind "$FERRY_PIP_CACHE_DIR" /var/cache/ferry-pip
fi

phase "copying $commit (git archive) to /root/ferry"
mkdir -p "$root/root/ferry"
git -C "$FERRY_ROOT" archive "$ref" | tar -x -C "$root/root/ferry"

# The environment a new user's root shell would have, plus the registry settings above.
envs=(HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 TERM=dumb
      DEBIAN_FRONTEND=noninteractive)
while IFS='=' read -r k v; do
  case "$k" in
    # a local wheel folder of this machine's (PIP_FIND_LINKS=/some/dir) is not in the root
    PIP_FIND_LINKS) [[ "$v" == *://* ]] && envs+=("$k=$v") ;;
    PIP_*|http_proxy|https_proxy|no_proxy|HTTP_PROXY|HTTPS_PROXY|NO_PROXY) envs+=("$k=$v") ;;
  esac
done < <(env)
[ -n "${FERRY_PIP_CACHE_DIR:-}" ] && envs+=(FERRY_PIP_CACHE_DIR=/var/cache/ferry-pip)
[ -n "${FERRY_JOBS:-}" ] && envs+=(FERRY_JOBS="$FERRY_JOBS")

inside='set -euo pipefail
update-ca-certificates >/dev/null 2>&1 || true
cd /root/ferry
t0=$(date +%s)
echo "== scripts/train.sh --set steps='"$steps"' (setup, build, train)"
scripts/train.sh --set steps='"$steps"' --output-dir /root/run
echo "== train.sh took $(( $(date +%s) - t0 )) s"
ckpt=$(cat /root/run/latest 2>/dev/null || true)
[ -n "$ckpt" ] && [ -f "/root/run/$(basename "$ckpt")/model.safetensors" ] \
  || { echo "fresh_check: train.sh wrote no checkpoint named by /root/run/latest"; exit 1; }
echo "== ferry-infer loads /root/run/$(basename "$ckpt")"
build/bin/ferry-infer --model "/root/run/$(basename "$ckpt")" --job generate --prompt "The licence" --max-new-tokens 8
echo "== the test suite: built by train.sh; registered and a sample run"
cd build
n=$(ctest -N | sed -n "s/^Total Tests: //p")
[ "${n:-0}" -gt 0 ] || { echo "fresh_check: ctest lists no tests"; exit 1; }
echo "ctest lists $n tests"
# the dependency check, the SIMD optimizer kernels on this CPU, the model configs, the block
ctest --output-on-failure -R "^(layering|targets/adamw_target\\..*|model_configs\\..*|model_block\\..*)$"
'
phase "running the README's first command inside (limit $limit s)"
status=0
timeout --kill-after=30 "$limit" chroot "$root" /usr/bin/env -i "${envs[@]}" /bin/bash -c "$inside" || status=$?
if [ "$status" = 0 ]; then
  phase "PASSED at $commit: a fresh Debian 12 root set up, built, trained and loaded the checkpoint"
else
  [ "$status" = 124 ] && ferry_log "fresh_check: timed out after $limit s"
  phase "FAILED at $commit (exit $status)"
  exit 1
fi
