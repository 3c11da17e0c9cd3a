#!/usr/bin/env bash
# Tests the release artefacts scripts/package.sh wrote into dist/, on this machine, the way a
# user installs them:
#   1. the tarball: checksum, unpack into a temp dir, `bin/outbox-relay --version`, then
#      scripts/demo.sh with the unpacked binary and the tarball's own config/ and migrations/;
#   2. the .deb: `apt-get install ./outbox-relay_*.deb` (Depends resolved), --version, the man
#      page and completions in place, the demo with /usr/bin/outbox-relay and
#      /usr/share/outbox-relay, then `dpkg -r` and the binary is gone.
# Exits non-zero with a message naming the failed check. Idempotent: cleans up its temp dir
# and removes the package again, also on failure. Debian/Ubuntu; root or sudo for step 2.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
fail() { echo "test-packages.sh: FAILED: $*" >&2; exit 1; }
step() { echo; echo "### $*"; }

VERSION=$(awk '/^\[package\]/ {p = 1; next} /^\[/ {p = 0} p && /^version *=/ {
  gsub(/.*= *"|".*/, ""); print; exit }' Cargo.toml)
[ -n "$VERSION" ] || fail "no version in Cargo.toml's [package]"
NAME="outbox-relay-$VERSION"
TARBALL="$ROOT/dist/$NAME-x86_64-linux-gnu.tar.gz"
DEB="$ROOT/dist/outbox-relay_${VERSION}-1_amd64.deb"
for f in "$TARBALL" "$TARBALL.sha256" "$DEB" "$DEB.sha256"; do
  [ -f "$f" ] || fail "$f not found: run scripts/package.sh first"
done

WORK=$(mktemp -d /tmp/outbox-relay-test-packages.XXXXXX)
chmod 755 "$WORK"
DEB_INSTALLED=
cleanup() {
  if [ -n "$DEB_INSTALLED" ]; then
    echo "cleanup: removing the outbox-relay package"
    $SUDO dpkg -r outbox-relay >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# --version must name the Cargo version.
check_version() {
  local bin=$1 out
  out=$("$bin" --version) || fail "$bin --version exited non-zero"
  echo "$bin --version: $out"
  case "$out" in
    "outbox-relay $VERSION" | "outbox-relay $VERSION "*) ;;
    *) fail "$bin --version printed '$out', expected version $VERSION" ;;
  esac
}

# Runs scripts/demo.sh with an installed binary and share dir; asserts it exits 0, used them,
# and printed exactly the committed events: OrderCreated twice, OrderPaid once, and nothing from
# the rolled-back transaction.
run_demo() {
  local bin=$1 share=$2 log=$3 n
  if ! OUTBOX_RELAY_BIN="$bin" OUTBOX_RELAY_SHARE="$share" scripts/demo.sh > "$log" 2>&1; then
    cat "$log" >&2
    fail "scripts/demo.sh with $bin exited non-zero (output above)"
  fi
  cat "$log"
  grep -qxF "== relay: $bin; config and migrations from $share" "$log" \
    || fail "the demo did not run $bin with $share"
  n=$(grep -c '"type":"OrderCreated"' "$log" || true)
  [ "$n" = 2 ] || fail "the demo with $bin printed $n OrderCreated events, expected 2"
  n=$(grep -c '"type":"OrderPaid"' "$log" || true)
  [ "$n" = 1 ] || fail "the demo with $bin printed $n OrderPaid events, expected 1"
  ! grep -q '"type":"CustomerUpgraded"' "$log" \
    || fail "the demo with $bin printed an event from a rolled-back transaction"
}

step "tarball: $(basename "$TARBALL")"
(cd dist && sha256sum --check --quiet "$(basename "$TARBALL").sha256") || fail "tarball checksum mismatch"
tar -xzf "$TARBALL" -C "$WORK"
TAR_DIR="$WORK/$NAME"
for f in bin/outbox-relay README.md config/stdout.toml migrations/001_outbox_table.sql; do
  [ -e "$TAR_DIR/$f" ] || fail "the tarball lacks $NAME/$f"
done
[ "$(tar -tzf "$TARBALL" | cut -d/ -f1 | sort -u)" = "$NAME" ] \
  || fail "the tarball has entries outside $NAME/"
if ldd "$TAR_DIR/bin/outbox-relay" | grep 'not found'; then
  fail "the tarball's binary needs libraries this machine lacks (above)"
fi
if command -v readelf >/dev/null 2>&1 && grep -q '\.symtab' <<<"$(readelf -S "$TAR_DIR/bin/outbox-relay")"; then
  fail "the tarball's binary is not stripped"
fi
check_version "$TAR_DIR/bin/outbox-relay"
# What the binary can generate must be in the tarball.
if "$TAR_DIR/bin/outbox-relay" man >/dev/null 2>&1; then
  [ -s "$TAR_DIR/share/man/man1/outbox-relay.1" ] || fail "the tarball lacks share/man/man1/outbox-relay.1"
fi
if "$TAR_DIR/bin/outbox-relay" completions bash >/dev/null 2>&1; then
  for f in outbox-relay.bash _outbox-relay outbox-relay.fish; do
    [ -s "$TAR_DIR/share/completions/$f" ] || fail "the tarball lacks share/completions/$f"
  done
fi
run_demo "$TAR_DIR/bin/outbox-relay" "$TAR_DIR" "$WORK/demo-tarball.log"
echo "tarball: ok"

step "Debian package: $(basename "$DEB")"
(cd dist && sha256sum --check --quiet "$(basename "$DEB").sha256") || fail ".deb checksum mismatch"
installed() { [ "$(dpkg-query -W -f='${Status}' outbox-relay 2>/dev/null)" = "install ok installed" ]; }
if installed; then
  echo "note: outbox-relay $(dpkg-query -W -f='${Version}' outbox-relay) is installed already; it is replaced, then removed"
fi
DEB_INSTALLED=1
install_deb() {
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --reinstall --no-install-recommends \
    "$DEB" > "$WORK/apt.log" 2>&1
}
# A machine whose package lists are stale or absent cannot fetch Depends: update once, retry.
if ! install_deb && ! { $SUDO apt-get update -qq && install_deb; }; then
  cat "$WORK/apt.log" >&2
  fail "apt-get install $DEB failed (output above)"
fi
echo "installed: outbox-relay $(dpkg-query -W -f='${Version}' outbox-relay)"
[ "$(dpkg-query -W -f='${Version}' outbox-relay)" = "$VERSION-1" ] || fail "dpkg does not list outbox-relay $VERSION-1"
[ -x /usr/bin/outbox-relay ] || fail "/usr/bin/outbox-relay missing after install"
[ "$(command -v outbox-relay)" = /usr/bin/outbox-relay ] \
  || echo "note: outbox-relay on PATH is $(command -v outbox-relay), not /usr/bin/outbox-relay"
check_version /usr/bin/outbox-relay
for f in /usr/share/outbox-relay/config/stdout.toml /usr/share/outbox-relay/migrations/001_outbox_table.sql \
  /usr/share/doc/outbox-relay/copyright /usr/share/doc/outbox-relay/README.md; do
  [ -f "$f" ] || fail "$f missing after install"
done
# What the binary can generate must be installed.
if /usr/bin/outbox-relay man >/dev/null 2>&1; then
  if command -v man >/dev/null 2>&1; then
    MANPAGE=$(man -w outbox-relay) || fail "man -w outbox-relay finds no man page"
    echo "man page: $MANPAGE"
  fi
  [ -s /usr/share/man/man1/outbox-relay.1.gz ] || fail "/usr/share/man/man1/outbox-relay.1.gz missing after install"
else
  echo "note: this binary has no 'man' command, so the package has no man page"
fi
if /usr/bin/outbox-relay completions bash >/dev/null 2>&1; then
  for f in /usr/share/bash-completion/completions/outbox-relay /usr/share/zsh/vendor-completions/_outbox-relay \
    /usr/share/fish/vendor_completions.d/outbox-relay.fish; do
    [ -s "$f" ] || fail "$f missing after install"
  done
  bash -n /usr/share/bash-completion/completions/outbox-relay || fail "the bash completion is not valid bash"
else
  echo "note: this binary has no 'completions' command, so the package has no completions"
fi
run_demo /usr/bin/outbox-relay /usr/share/outbox-relay "$WORK/demo-deb.log"
$SUDO dpkg -r outbox-relay >/dev/null || fail "dpkg -r outbox-relay failed"
DEB_INSTALLED=
[ ! -e /usr/bin/outbox-relay ] || fail "/usr/bin/outbox-relay still there after dpkg -r"
[ ! -e /usr/share/outbox-relay ] || fail "/usr/share/outbox-relay still there after dpkg -r"
! installed \
  || fail "dpkg still lists outbox-relay as installed"
echo "Debian package: ok"

echo
echo "test-packages.sh: the tarball and the .deb of outbox-relay $VERSION install, run the demo and (the .deb) uninstall cleanly"
