#!/usr/bin/env bash
# Build the OCI images of the operator and the gateway: no container daemon,
# no registry, same inputs -> same digests. The assembly is e2e/images/oci.py.
#
#   e2e/images/build.sh [--out DIR] [--profile release|debug] [--target-dir DIR]
#                       [--repo PREFIX] [--binary PATH] [operator|gateway|all]
#
#   --out DIR         where images go (default $HOME/.cache/pec-operator/images):
#                     DIR/NAME-VERSION.oci/ (OCI layout) and DIR/NAME-VERSION.oci.tar
#                     (OCI archive, for `ctr -n k8s.io images import`)
#   --profile P       cargo profile (default release; debug = cargo's dev profile)
#   --target-dir DIR  cargo target directory (default: $CARGO_TARGET_DIR, else cargo's)
#   --repo PREFIX     reference prefix (default docker.io/pec): docker.io/pec/pec-gateway:VERSION
#   --binary PATH     skip cargo and put PATH in the image (one image only; for tests)
#
# Prints one line per image: NAME REF DIGEST ARCHIVE (DIGEST: the manifest's).
# SOURCE_DATE_EPOCH (default: commit time of HEAD, else 0) sets every mtime
# and the image's `created`. Needs bash, python3, ldd, cargo; SoftHSM2's
# module (apt-get install softhsm2) goes into every image.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

out=${HOME}/.cache/pec-operator/images
profile=release
target_dir=${CARGO_TARGET_DIR:-}
repo=docker.io/pec
binary=
what=all

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --target-dir) target_dir=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    operator|gateway|all) what=$1; shift ;;
    -h|--help) usage ;;
    *) echo "build.sh: unknown argument: $1" >&2; usage ;;
  esac
done
case $what in
  all) targets="operator gateway" ;;
  *) targets=$what ;;
esac
if [ -n "$binary" ] && [ "$what" = all ]; then
  echo "build.sh: --binary builds one image: name operator or gateway" >&2; exit 2
fi

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git -C "$root" log -1 --format=%ct 2>/dev/null || true)
  SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
fi

# cargo's "debug" output directory belongs to its "dev" profile.
case $profile in
  debug|dev) cargo_profile=dev; profile_dir=debug ;;
  *) cargo_profile=$profile; profile_dir=$profile ;;
esac

crate_version() { # crate_version CARGO_TOML: the package version (workspace-inherited too)
  python3 - "$1" "$root/Cargo.toml" <<'EOF'
import sys, tomllib
pkg = tomllib.load(open(sys.argv[1], "rb"))["package"]
v = pkg["version"]
if isinstance(v, dict):  # version.workspace = true
    v = tomllib.load(open(sys.argv[2], "rb"))["workspace"]["package"]["version"]
print(v)
EOF
}

for t in $targets; do
  case $t in
    operator) name=pec-operator; manifest=$root/Cargo.toml; ports=(--port 8080/tcp) ;;
    gateway) name=pec-gateway; manifest=$root/crates/pec-gateway/Cargo.toml
             ports=(--port 25/tcp --port 465/tcp --port 8080/tcp) ;;
  esac
  bin=$binary
  if [ -z "$bin" ]; then
    tdir=$target_dir
    [ -n "$tdir" ] || tdir=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    echo "build.sh: cargo build --profile $cargo_profile -p $name --bin $name (target dir $tdir)" >&2
    (cd "$root" && cargo build --profile "$cargo_profile" --target-dir "$tdir" -p "$name" --bin "$name" >&2)
    bin=$tdir/$profile_dir/$name
  fi
  python3 "$here/oci.py" --name "$name" --version "$(crate_version "$manifest")" \
    --binary "$bin" --out "$out" --epoch "$SOURCE_DATE_EPOCH" --repo "$repo" "${ports[@]}" \
    --module /usr/lib/softhsm/libsofthsm2.so --file /etc/ssl/certs/ca-certificates.crt
done
