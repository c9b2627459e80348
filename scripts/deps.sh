#!/usr/bin/env bash
# Installs what warmroll's tests and sandbox need on a Debian machine, as root.
# Sourced by scripts/test and scripts/sandbox; `ensure_deps` is idempotent.

# binary -> Debian package that provides it
WARMROLL_DEB_DEPS=(
  "containerd:containerd"
  "runc:runc"
  "docker-registry:docker-registry"
  "protoc:protobuf-compiler"
  "busybox:busybox-static"
  "umount:mount"
  "setpriv:util-linux"
  "pgrep:procps"
)

ensure_deps() {
  local missing=() pkgs=() entry bin pkg
  for entry in "${WARMROLL_DEB_DEPS[@]}"; do
    bin=${entry%%:*}; pkg=${entry#*:}
    command -v "$bin" >/dev/null 2>&1 || { missing+=("$bin"); pkgs+=("$pkg"); }
  done
  if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not on PATH; install the Rust toolchain (rustup) first" >&2
    return 1
  fi
  [ ${#pkgs[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing ${missing[*]}; as root run: apt-get install -y ${pkgs[*]}" >&2
    return 1
  fi
  echo "installing Debian packages: ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}
