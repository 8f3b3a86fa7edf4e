#!/usr/bin/env bash
# Installs protoc and protobuf's well-known .proto files when they are missing (Debian's
# protobuf-compiler and libprotobuf-dev, from the machine's configured apt sources): the
# etcd-client crate's build script runs protoc on etcd's .proto files, which import
# descriptor.proto and struct.proto. Needed before any cargo build of switchyard.
set -euo pipefail

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

if command -v protoc >/dev/null 2>&1 && [[ -f /usr/include/google/protobuf/descriptor.proto ]]; then
  exit 0
fi
echo "install-protoc: installing protobuf-compiler and libprotobuf-dev (Debian)"
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  protobuf-compiler libprotobuf-dev >/dev/null
