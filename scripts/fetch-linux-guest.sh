#!/usr/bin/env bash
# Fetches the Linux guest the whole-guest tests boot: Debian's kernel, a static busybox, and the
# few kernel modules the tests load; installs the host tools they need (SeaBIOS, e2fsprogs,
# xorriso). Run as root (it uses apt); idempotent.
#
#   fetch-linux-guest.sh [i386|amd64]
#     i386 (default): linux-image-686 and busybox-static of the i386 foreign architecture, for v86.
#     amd64: linux-image-amd64 and busybox-static of the native architecture, for qemu-system-x86_64
#            (installed here if missing, with fio, which the Linux bench puts into the guest).
#
#   cache: i386 $SPINDLE_GUEST_CACHE (default ~/.cache/spindle/linux-i386),
#          amd64 $SPINDLE_GUEST_CACHE_AMD64 (default ~/.cache/spindle/linux-amd64)/
#     vmlinuz                           the kernel (bzImage)
#     busybox                           static busybox
#     lib/modules/<ver>/kernel/...      the selected modules and their depends= closure
#     READY                             the kernel version; written last, so a half-done fetch is redone
set -euo pipefail

arch="${1:-i386}"
case "$arch" in
  i386)
    cache="${SPINDLE_GUEST_CACHE:-$HOME/.cache/spindle/linux-i386}"
    meta=linux-image-686:i386 bbox=busybox-static:i386 qual=:i386 ;;
  amd64)
    # Native packages only: this guest is for a host that runs amd64 itself.
    if [ "$(dpkg --print-architecture)" != amd64 ]; then
      echo "fetch-linux-guest: amd64 needs an amd64 host (this is $(dpkg --print-architecture))" >&2
      exit 1
    fi
    cache="${SPINDLE_GUEST_CACHE_AMD64:-$HOME/.cache/spindle/linux-amd64}"
    meta=linux-image-amd64 bbox=busybox-static qual= ;;
  *)
    echo "usage: fetch-linux-guest.sh [i386|amd64]" >&2
    exit 2 ;;
esac

# The host tools amd64's users need, checked even when the cache is ready (a fresh host may
# share a cache directory but lack the programs).
need=()
if [ "$arch" = amd64 ]; then
  command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
  command -v fio >/dev/null 2>&1 || need+=(fio)
fi
if [ -f "$cache/READY" ] && [ ${#need[@]} -eq 0 ]; then
  echo "fetch-linux-guest: $cache is ready (kernel $(cat "$cache/READY"))"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "fetch-linux-guest: run as root (it uses apt-get)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive

# --- host side: the architecture and the tools the tests run ------------------------------------
if [ "$arch" = i386 ] && ! dpkg --print-foreign-architectures | grep -qx i386; then
  dpkg --add-architecture i386
fi
# (apt-cache show succeeds if any one name is known: ask once per package.)
for pkg in "$meta" "$bbox" "${need[@]}"; do
  if ! apt-cache show "$pkg" >/dev/null 2>&1; then
    apt-get update -qq
    break
  fi
done
[ -f /usr/share/seabios/bios-256k.bin ] || [ -f /usr/share/seabios/bios.bin ] || need+=(seabios)
command -v mke2fs >/dev/null 2>&1 && command -v debugfs >/dev/null 2>&1 || need+=(e2fsprogs)
command -v xorrisofs >/dev/null 2>&1 || need+=(xorriso)
if [ ${#need[@]} -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${need[@]}" >/dev/null
fi
if [ -f "$cache/READY" ]; then
  echo "fetch-linux-guest: $cache is ready (kernel $(cat "$cache/READY"))"
  exit 0
fi

# --- guest side: download and unpack the kernel and busybox packages ---------------------------
# $meta is a metapackage; the kernel is the package it depends on.
kpkg="$(apt-cache depends "$meta" | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')"
if [ -z "$kpkg" ]; then
  echo "fetch-linux-guest: cannot resolve the kernel package $meta depends on" >&2
  exit 1
fi
case "$kpkg" in *:*) ;; *) kpkg="$kpkg$qual" ;; esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# apt-get download drops privileges to _apt; let it write here (else it warns and runs unsandboxed).
chmod 0755 "$work"
mkdir "$work/debs"
if id _apt >/dev/null 2>&1; then chown _apt "$work/debs"; fi
(cd "$work/debs" && apt-get download -qq "$kpkg" "$bbox")
for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$work/root"
done

vers=("$work"/root/lib/modules/*)
if [ ${#vers[@]} -ne 1 ] || [ ! -d "${vers[0]}" ]; then
  echo "fetch-linux-guest: expected one lib/modules/<version> in $kpkg" >&2
  exit 1
fi
ver="$(basename "${vers[0]}")"
src="$work/root/lib/modules/$ver"
[ -f "$work/root/boot/vmlinuz-$ver" ] || { echo "fetch-linux-guest: no boot/vmlinuz-$ver in $kpkg" >&2; exit 1; }
[ -x "$work/root/bin/busybox" ] || { echo "fetch-linux-guest: no bin/busybox in busybox-static" >&2; exit 1; }
if find "$src/kernel" -name '*.ko.*' -print -quit | grep -q .; then
  echo "fetch-linux-guest: $kpkg ships compressed modules; the tests read plain .ko only" >&2
  exit 1
fi

# --- select modules: the wanted trees plus their depends= closure -------------------------------
# name<TAB>relative path, names normalised to '_' (module names treat '-' and '_' alike).
(cd "$src" && find kernel -name '*.ko') |
  awk -F/ '{ n = $NF; sub(/\.ko$/, "", n); gsub(/-/, "_", n); print n "\t" $0 }' >"$work/index"

(cd "$src" && {
  find kernel/drivers/ata kernel/drivers/cdrom kernel/drivers/block kernel/drivers/virtio \
       kernel/fs/ext4 kernel/fs/jbd2 kernel/fs/isofs -name '*.ko' 2>/dev/null
  # drivers/scsi's top level holds the midlayer and upper drivers (sd, sr, sg, virtio_scsi); its
  # subfolders are host adapters whose closure pulls in NIC and target stacks: leave them out.
  find kernel/drivers/scsi -maxdepth 1 -name '*.ko' 2>/dev/null
  find kernel/fs kernel/lib kernel/crypto kernel/arch/x86/crypto -maxdepth 1 \
       \( -path 'kernel/fs/mbcache.ko' -o -path 'kernel/lib/crc*.ko' -o -path 'kernel/crypto/crc32c*.ko' \
          -o -path 'kernel/arch/x86/crypto/crc32c*.ko' \) 2>/dev/null
}) | sort -u >"$work/want"

# depends= lives in the .modinfo section as NUL-terminated "key=value" strings.
depends_of() { tr '\0' '\n' <"$src/$1" | sed -n 's/^depends=//p' | tr ',' '\n' | sed '/^$/d; s/-/_/g'; }

cp "$work/want" "$work/todo"
while [ -s "$work/todo" ]; do
  : >"$work/next"
  while read -r rel; do
    depends_of "$rel" | while read -r dep; do
      path="$(awk -F'\t' -v n="$dep" '$1 == n { print $2; exit }' "$work/index")"
      if [ -z "$path" ]; then
        echo "fetch-linux-guest: $rel depends on $dep, which is not in $kpkg" >&2
        exit 1
      fi
      grep -qxF "$path" "$work/want" || echo "$path"
    done >>"$work/next"
  done <"$work/todo"
  sort -u "$work/next" -o "$work/todo"
  cat "$work/todo" >>"$work/want"
  sort -u "$work/want" -o "$work/want"
done

# --- fill the cache; READY last -----------------------------------------------------------------
rm -rf "$cache"
mkdir -p "$cache/lib/modules/$ver"
cp "$work/root/boot/vmlinuz-$ver" "$cache/vmlinuz"
cp "$work/root/bin/busybox" "$cache/busybox"
chmod 0755 "$cache/busybox"
(cd "$src" && while read -r rel; do cp --parents "$rel" "$cache/lib/modules/$ver/"; done <"$work/want")
cp "$src/modules.builtin" "$cache/lib/modules/$ver/" 2>/dev/null || true
echo "$ver" >"$cache/READY"
echo "fetch-linux-guest: kernel $ver, $(wc -l <"$work/want") modules, $(du -sh "$cache" | cut -f1) in $cache"
