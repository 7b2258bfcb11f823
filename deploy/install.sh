#!/bin/sh
# Installs knockd from this source tree: binaries, the systemd unit, the
# example configuration (only if none exists) and the devices directory.
# Idempotent. DESTDIR installs into a staging root (packaging, tests).
#
#   sudo deploy/install.sh            # build (release) and install
#   sudo systemctl enable --now knockd
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${DESTDIR:-}
# KNOCKD_BIN_DIR: install already-built binaries from there instead.
bin=${KNOCKD_BIN_DIR:-}
if [ -z "$bin" ]; then
    # Fleet mode (cluster:) when its build tools are here: protoc and the
    # protobuf well-known types (protobuf-compiler, libprotobuf-dev).
    features=
    if command -v protoc >/dev/null && [ -e /usr/include/google/protobuf/descriptor.proto ]; then
        features="--features cluster"
    else
        echo "install.sh: no protoc or libprotobuf-dev: building without fleet mode (cluster:)" >&2
    fi
    # shellcheck disable=SC2086
    cargo build --release --manifest-path "$root/Cargo.toml" -p knockd --bins $features
    bin=$root/target/release
fi
install -d -m 0755 "$dest/usr/local/sbin" "$dest/usr/local/bin" "$dest/etc/systemd/system" \
    "$dest/usr/local/share/doc/knockd"
install -m 0755 "$bin/knockd" "$dest/usr/local/sbin/knockd"
install -m 0755 "$bin/knockctl" "$dest/usr/local/bin/knockctl"
install -m 0644 "$root/deploy/knockd.service" "$dest/etc/systemd/system/knockd.service"
install -m 0644 "$root/README.md" "$root/docs/PROTOCOL.md" "$dest/usr/local/share/doc/knockd/"
install -d -m 0700 "$dest/etc/knockd" "$dest/etc/knockd/devices.d"
if [ ! -e "$dest/etc/knockd/knockd.yaml" ]; then
    install -m 0600 "$root/deploy/knockd.example.yaml" "$dest/etc/knockd/knockd.yaml"
    echo "installed an example /etc/knockd/knockd.yaml: set interfaces and doors, then"
    echo "  knockctl device add NAME --group admins --host THIS_HOST > NAME-profile.yaml"
fi
if [ -z "$dest" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "then: systemctl enable --now knockd"
fi
