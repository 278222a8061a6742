#!/usr/bin/env bash
# SPDX-License-Identifier: MIT OR Apache-2.0
# Installs the Debian 12 packages that building, testing and the demo need: a C
# toolchain for linking, OpenSSL, GStreamer (development files, tools and plugins),
# mosquitto and python3.
# Runs as root or through sudo; skips apt when everything is already present.
set -euo pipefail

packages=(
  # C compiler and linker, which rustc needs to link on Linux.
  gcc libc6-dev pkg-config ca-certificates
  # OpenSSL headers for MQTT over TLS (native-tls), and the openssl tool with which the
  # TLS tests make their certificates.
  libssl-dev openssl
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  mosquitto mosquitto-clients
  python3 python3-pip
  # kill, used by the tests to interrupt `patchflow run`.
  procps
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "system packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
