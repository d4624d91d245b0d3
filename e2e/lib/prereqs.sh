# What the tests, the demo and the benchmarks need besides Rust and Go, from
# Debian's packages. Source it and call `ensure_prereqs`: it installs only
# what is missing (as root, or through sudo), so it is cheap on a ready machine.
#   curl, openssl, python3   the local cluster's scripts and certificates
#   softhsm2-util            the PKCS#11 token of the HSM tests (softhsm2)
#   clamd                    the antivirus the gateway tests scan with (clamav-daemon)
#   dnsmasq                  the DNS server of the gateway's MX test (dnsmasq-base)
#   containerd, runc, CNI    the real nodes (containerd, runc, containernetworking-plugins)
#   iptables, ip             kube-proxy's rules and the nodes' bridges (iptables, iproute2)
# The gateway benchmark also needs postfix, its second floor: e2e/bench.sh
# installs it with `install_missing` (the tests do not need it).

ensure_prereqs() {
  install_missing curl:curl openssl:openssl python3:python3 softhsm2-util:softhsm2 clamd:clamav-daemon \
    dnsmasq:dnsmasq-base containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
    iptables:iptables ip:iproute2
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
}

# install_missing TOOL:PACKAGE...: installs each PACKAGE whose TOOL (a
# command, or an absolute path) is missing.
install_missing() {
  local need=() tool
  for tool in "$@"; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
  done
  if [ ${#need[@]} -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "installing Debian packages: ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}
