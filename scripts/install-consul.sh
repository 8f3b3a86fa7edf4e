#!/usr/bin/env bash
# Installs the `consul` binary when it is not on PATH.
#
# Debian bookworm dropped the consul package; bullseye still ships 1.8.7. We fetch it with a
# *private* apt configuration (its own sources list and lists directory) so the machine's own
# sources are never touched: adding bullseye to them would let apt "upgrade" libc and friends.
# The package is unpacked with `dpkg-deb -x` — nothing is installed through dpkg — and the
# binary is linked into $CONSUL_BIN_DIR (default /usr/local/bin).
set -euo pipefail

if command -v consul >/dev/null 2>&1; then
  echo "consul already installed: $(command -v consul) ($(consul version | head -1))"
  exit 0
fi

BIN_DIR="${CONSUL_BIN_DIR:-/usr/local/bin}"
WORK="${CONSUL_WORK_DIR:-/var/cache/switchyard-consul}"
mkdir -p "$WORK/lists/partial" "$WORK/archives/partial" "$WORK/root" "$BIN_DIR"

# The mirror comes from the machine's own apt sources (deb822 or one-line format).
mirror=""
if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
  mirror="$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' \
    /etc/apt/sources.list.d/*.sources | head -1)"
fi
if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
  mirror="$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) {print $i; exit}}' \
    /etc/apt/sources.list | head -1)"
fi
if [[ -z "$mirror" ]]; then
  echo "install-consul: no Debian mirror found in /etc/apt/sources.list*" >&2
  exit 1
fi
mirror="${mirror%/}"
echo "install-consul: using mirror $mirror (bullseye, private apt config in $WORK)"

echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bullseye main" \
  >"$WORK/sources.list"

apt_opts=(
  -o "Dir::Etc::SourceList=$WORK/sources.list"
  -o "Dir::Etc::SourceParts=-"
  -o "Dir::State::Lists=$WORK/lists"
  -o "Dir::Cache::Archives=$WORK/archives"
  -o "Dir::Cache::pkgcache="
  -o "Dir::Cache::srcpkgcache="
  -o "APT::Get::List-Cleanup=0"
)
apt-get "${apt_opts[@]}" update -qq
(cd "$WORK/archives" && apt-get "${apt_opts[@]}" download consul)

deb="$(ls -t "$WORK"/archives/consul_*.deb | head -1)"
dpkg-deb -x "$deb" "$WORK/root"
install -m 0755 "$WORK/root/usr/bin/consul" "$BIN_DIR/consul"
echo "install-consul: installed $("$BIN_DIR/consul" version | head -1) to $BIN_DIR/consul"
