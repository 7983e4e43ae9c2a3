#!/usr/bin/env bash
# bun run test:image: builds the Dockerfile with buildah (no Docker engine needed), runs the image
# and checks it: the image's settings, GET /health, the binary's own healthcheck, one delivery
# through the container into a fake LMTP server on this machine, one message through the spool.
#
# Runs as root on Debian (bookworm) after `bun install`; installs buildah and debootstrap from
# Debian's packages when they are missing. No container registry is needed: the two base images
# the Dockerfile names (BUN_IMAGE, RUNTIME_IMAGE) are replaced by stand-ins built here, offline,
# from a debootstrap'ed bookworm (minbase, trimmed like the slim image), plus this machine's own
# bun binary for the build stage. The rootfs tarball is cached in .cache/test-image/.
#
# Environment:
#   DEBIAN_MIRROR        mirror for debootstrap (default: the one in this machine's apt sources)
#   TEST_IMAGE_STORAGE   buildah's storage (default /var/lib/containers/mail-relay-test, vfs driver);
#                        rm -rf it to reclaim the space
#   REBUILD_STANDINS=1   rebuild the stand-in base images (the cached rootfs is kept)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'test-image: %s\n' "$*"; }
die() { printf 'test-image: %s\n' "$*" >&2; exit 1; }
now_ms() { date +%s%3N; }
script_start=$(now_ms)

[ "$(id -u)" -eq 0 ] || die "run as root (buildah's chroot isolation and debootstrap need it)"
command -v bun >/dev/null || die "bun is not installed (npm install -g bun@1.4.5)"
[ -d node_modules/smtp-server ] || die "run bun install --frozen-lockfile first (the fake LMTP server needs smtp-server)"

# --- tools -----------------------------------------------------------------------------------
need=()
command -v buildah >/dev/null || need+=(buildah)
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]} from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

storage="${TEST_IMAGE_STORAGE:-/var/lib/containers/mail-relay-test}"
export TEST_IMAGE_BUILDAH_ARGS="--storage-driver vfs --root $storage/root --runroot $storage/run"
# shellcheck disable=SC2206
BUILDAH=(buildah $TEST_IMAGE_BUILDAH_ARGS)
export BUILDAH_ISOLATION=chroot

image_exists() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

# --- stand-in base images --------------------------------------------------------------------
cache=.cache/test-image
mkdir -p "$cache"
rootfs_tgz="$cache/bookworm-minbase-rootfs.tgz"
bun_bin="$(readlink -f "$(command -v bun)")"
bun_version="$(bun --version)"
pinned="$(sed -n 's/^ARG BUN_IMAGE=.*:\([0-9][0-9.]*\)$/\1/p' Dockerfile)"
[ "$bun_version" = "$pinned" ] || log "warning: this machine has bun $bun_version, the Dockerfile pins $pinned; the stand-in uses $bun_version"
runtime_standin="localhost/bookworm-slim-standin:latest"
bun_standin="localhost/bun-standin:$bun_version"

log "building stand-in base images offline from debootstrap (no container registry is used)"
if [ ! -s "$rootfs_tgz" ]; then
  mirror="${DEBIAN_MIRROR:-}"
  if [ -z "$mirror" ]; then
    # The mirror this machine's apt already uses (deb822 .sources first, then one-line .list).
    mirror="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)"
    [ -n "$mirror" ] || mirror="$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
      sed -E 's/\[[^]]*\]//' | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)"
  fi
  [ -n "$mirror" ] || die "no Debian mirror found in the apt sources; set DEBIAN_MIRROR"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  t=$(now_ms)
  log "debootstrap --variant=minbase bookworm (about 30 s, once; cached in $rootfs_tgz)"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  # Trim it the way the slim image is trimmed: no package lists, caches, manuals or locales.
  (
    cd "$work/rootfs"
    rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/* var/log/* \
      usr/share/man/* usr/share/info/* usr/share/locale/* usr/share/lintian/*
    find usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
    find usr/share/doc -mindepth 1 -type d -empty -delete
  )
  tar --numeric-owner -C "$work/rootfs" -czf "$rootfs_tgz.part" .
  mv "$rootfs_tgz.part" "$rootfs_tgz"
  rm -rf "$work/rootfs"
  log "rootfs: $(du -h "$rootfs_tgz" | cut -f1) compressed, in $(( ($(now_ms) - t) / 1000 )) s"
else
  log "rootfs: cached $rootfs_tgz"
fi

if [ "${REBUILD_STANDINS:-}" = 1 ] || ! image_exists "$runtime_standin"; then
  ctx="$cache/runtime-context"
  mkdir -p "$ctx"
  ln -f "$rootfs_tgz" "$ctx/rootfs.tgz" 2>/dev/null || cp "$rootfs_tgz" "$ctx/rootfs.tgz"
  printf 'FROM scratch\nADD rootfs.tgz /\nCMD ["bash"]\n' >"$ctx/Containerfile"
  "${BUILDAH[@]}" bud --quiet --isolation chroot --pull=never -t "$runtime_standin" -f "$ctx/Containerfile" "$ctx" >/dev/null
  log "stand-in $runtime_standin for debian:bookworm-slim: built"
else
  log "stand-in $runtime_standin: present"
fi

if [ "${REBUILD_STANDINS:-}" = 1 ] || ! image_exists "$bun_standin"; then
  ctx="$cache/bun-context"
  mkdir -p "$ctx"
  cp "$bun_bin" "$ctx/bun"
  # Laid out like the official bun image: bun and bunx in /usr/local/bin, working in /home/bun/app.
  printf '%s\n' "FROM $runtime_standin" "COPY bun /usr/local/bin/bun" \
    "RUN ln -s bun /usr/local/bin/bunx && mkdir -p /home/bun/app" "WORKDIR /home/bun/app" 'CMD ["bun"]' >"$ctx/Containerfile"
  "${BUILDAH[@]}" bud --quiet --isolation chroot --pull=never -t "$bun_standin" -f "$ctx/Containerfile" "$ctx" >/dev/null
  rm -f "$ctx/bun"
  log "stand-in $bun_standin for oven/bun:$pinned (this machine's bun $bun_version): built"
else
  log "stand-in $bun_standin: present"
fi

# --- the image -------------------------------------------------------------------------------
image="localhost/mail-relay:test"
# The build stage's `bun install` reads the packages from this machine's bun cache (filled by
# `bun install`), mounted in: the build needs no network and downloads nothing again.
bun_cache="$(bun pm cache 2>/dev/null | tail -n1)"
cache_mount=()
[ -d "$bun_cache" ] && cache_mount=(-v "$bun_cache:/root/.bun/install/cache")
log "building the Dockerfile (buildah bud, vfs storage, chroot isolation, cached layers)"
t=$(now_ms)
"${BUILDAH[@]}" bud --isolation chroot --layers --format docker --pull=never "${cache_mount[@]}" \
  --build-arg "BUN_IMAGE=$bun_standin" --build-arg "RUNTIME_IMAGE=$runtime_standin" \
  -t "$image" -f Dockerfile . >"$cache/build.log" 2>&1 ||
  { tail -n 40 "$cache/build.log" >&2; die "the image did not build (full log: $cache/build.log)"; }
build_ms=$(( $(now_ms) - t ))
log "built $image in $(awk "BEGIN{printf \"%.1f\", $build_ms/1000}") s"

# --- run it and check it ---------------------------------------------------------------------
export TEST_IMAGE_BUILD_MS="$build_ms" TEST_IMAGE_STANDIN_BASE="$runtime_standin"
bun scripts/test-image-run.ts "$image"
log "whole run: $(( ($(now_ms) - script_start) / 1000 )) s"
