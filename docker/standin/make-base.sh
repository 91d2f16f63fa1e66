#!/usr/bin/env bash
# Makes a stand-in for python:3.11-slim-bookworm where no image registry can be reached.
#
#   docker/standin/make-base.sh [IMAGE]      (default: localhost/hingeloss-base:python3.11-bookworm)
#
# debootstrap builds a minimal Debian bookworm root (Debian's python3 is 3.11) with what the
# official slim image offers to docker/Dockerfile: `python` and `pip` on PATH, the venv module,
# apt with empty package lists, bash, and useradd. The root is imported into podman (or, with
# CONTAINER_ENGINE=docker, into Docker) under IMAGE; build with --build-arg PYTHON_IMAGE=IMAGE.
# It needs root, debootstrap and a Debian mirror (DEBIAN_MIRROR); an existing IMAGE is kept
# unless FORCE=1.
set -euo pipefail

image=${1:-localhost/hingeloss-base:python3.11-bookworm}
engine=${CONTAINER_ENGINE:-podman}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if [[ ${FORCE:-0} != 1 ]] && "$engine" image exists "$image" 2>/dev/null; then
    echo "make-base: $image exists (FORCE=1 rebuilds it)"
    exit 0
fi
for tool in debootstrap "$engine"; do
    command -v "$tool" >/dev/null || { echo "make-base: $tool is not installed" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "make-base: debootstrap needs root" >&2; exit 1; }

root=$(mktemp -d "${TMPDIR:-/var/tmp}/hingeloss-base.XXXXXX")
trap 'rm -rf "$root"' EXIT

# python-is-python3 gives `python`; removing EXTERNALLY-MANAGED lets root's pip install into the
# system Python, as the official image (which has no such marker) allows.
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
    bookworm "$root" "$mirror"
cat > "$root/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security_mirror bookworm-security main
SOURCES
rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
ln -sf /usr/bin/pip3 "$root/usr/bin/pip"
# The official slim image ships with empty package lists and no caches or docs.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/*.log \
    "$root"/usr/share/doc/* "$root"/usr/share/man/*
chroot "$root" python3 -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11), sys.version'

tar --numeric-owner -C "$root" -c . | "$engine" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$image"
echo "make-base: imported $image"
