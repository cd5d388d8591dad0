#!/usr/bin/env bash
# Builds two versions of a Debian bookworm system as raw ext4 disk images, v1.img and v2.img,
# into OUT_DIR, from the package mirror in /etc/apt/sources.list(.d) (mmdebstrap's default).
# v2 = v1's recipe followed by a "monthly update": a few packages installed, a few purged,
# configuration edited, a user added. Both trees come from mmdebstrap with a fixed
# SOURCE_DATE_EPOCH, and both images from `mke2fs -d` with a fixed UUID, hash seed and time, so
# the same recipe on the same mirror state gives the same file contents and layout; not the same
# bytes: `mke2fs -d` copies each file's atime and ctime from the tree, which the build does not
# pin, so two builds differ in inode tables (about 550 blocks of a 256 MiB image).
#
# usage: build.sh full|small OUT_DIR
#   full:  minbase + cloud kernel + a few services, 2 GiB images (a few minutes)
#   small: minbase only, v2 adds one package, 256 MiB images (for ./scripts/test)
# Also writes OUT_DIR/v2-inplace.img (full only): v1.img with v2's tree copied over it through
# fuse2fs, so files that did not change keep their blocks (an image edited in place).
# The caller (tests/src/debian_image.rs) keys its cache by a hash of this file and the profile.
set -euo pipefail
profile=$1
out=$2
mkdir -p "$out"
work=$(mktemp -d "$out/work.XXXXXX")
trap 'umount "$work/mnt" 2>/dev/null || true; rm -rf "$work"' EXIT

export SOURCE_DATE_EPOCH=1732924800   # 2024-11-30 00:00 UTC
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH
uuid=4d455441-4c52-4143-4b00-000000000001
hash_seed=4d455441-4c52-4143-4b00-000000000002

case "$profile" in
  full)
    size=2G
    include=linux-image-cloud-amd64,systemd-sysv,udev,dbus,openssh-server,chrony,rsyslog,cron,logrotate,iproute2,ifupdown,isc-dhcp-client,sudo,less,vim-tiny,ca-certificates,curl,python3,locales,man-db,bash-completion
    update=(
      'chroot "$1" apt-get install -y --no-install-recommends nftables htop tcpdump jq git unattended-upgrades'
      'chroot "$1" apt-get purge -y --autoremove vim-tiny rsyslog isc-dhcp-client'
      'printf "PasswordAuthentication no\nPermitRootLogin no\n" > "$1"/etc/ssh/sshd_config.d/50-metalrack.conf'
      'sed -i "s/^pool .*/server ntp.example.net iburst/" "$1"/etc/chrony/chrony.conf'
      'printf "net.ipv4.ip_forward = 1\nvm.swappiness = 10\n" > "$1"/etc/sysctl.d/90-metalrack.conf'
      'echo "Metalrack image, update 2024-12" > "$1"/etc/motd'
      'chroot "$1" useradd --create-home --shell /bin/bash --uid 1001 operator2'
    )
    ;;
  small)
    size=256M
    include=
    update=('chroot "$1" apt-get install -y --no-install-recommends less')
    ;;
  *) echo "usage: build.sh full|small OUT_DIR" >&2; exit 2 ;;
esac

# Debs are downloaded once and shared by the two builds (mmdebstrap(1), "EXAMPLES").
cache="$out/apt-cache"
mkdir -p "$cache"
common=(
  --mode=root --variant=minbase ${include:+--include="$include"}
  --setup-hook='mkdir -p "$1"/var/cache/apt/archives/'
  --setup-hook="sync-in $cache /var/cache/apt/archives/"
  # Cloud-image practice: host keys and machine-id are made on first boot.
  --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*_key* ; : > "$1"/etc/machine-id'
)
tree() {
  local name=$1; shift
  mmdebstrap "${common[@]}" "$@" \
    --customize-hook="sync-out /var/cache/apt/archives $cache" \
    bookworm "$work/$name" >"$work/$name.log" 2>&1 || { tail -30 "$work/$name.log" >&2; exit 1; }
}
image() {
  mke2fs -q -t ext4 -L root -U "$uuid" -E "hash_seed=$hash_seed,root_owner=0:0" \
    -d "$work/$1" "$work/$1.img" "$size"
}
tree v1
hooks=()
for h in "${update[@]}"; do hooks+=(--customize-hook="$h"); done
tree v2 "${hooks[@]}"
image v1
image v2
if [ "$profile" = full ] && command -v fuse2fs >/dev/null; then
  cp --sparse=always "$work/v1.img" "$work/v2-inplace.img"
  mkdir "$work/mnt"
  fuse2fs -o fakeroot "$work/v2-inplace.img" "$work/mnt"
  # Only files whose bytes differ are rewritten (--checksum), as a package manager would.
  rsync -aHAX --checksum --delete "$work/v2/" "$work/mnt/"
  umount "$work/mnt"
  e2fsck -fn "$work/v2-inplace.img" >/dev/null
  mv "$work/v2-inplace.img" "$out/"
fi
# What changed between the trees, for the report.
(diff -rq --no-dereference "$work/v1" "$work/v2" 2>/dev/null || true) | sort > "$out/tree-diff.txt"
du -sb "$work/v1" "$work/v2" | awk '{print $1}' > "$out/tree-bytes.txt"
mv "$work/v1.img" "$work/v2.img" "$out/"
