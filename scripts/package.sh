#!/usr/bin/env bash
# Builds the release artefacts into dist/:
#   outbox-relay-<version>-x86_64-linux-gnu.tar.gz (+ .sha256)
#       outbox-relay-<version>/bin/outbox-relay (stripped), LICENSE, README.md, CHANGELOG.md,
#       config/, migrations/, share/man/man1/outbox-relay.1, share/completions/
#   outbox-relay_<version>-1_amd64.deb (+ .sha256)
#       /usr/bin/outbox-relay, /usr/share/outbox-relay/{config,migrations},
#       /usr/share/doc/outbox-relay/, the man page and shell completions
# The binary links glibc and OpenSSL 3 dynamically (librdkafka is built in statically); the
# .deb's Depends are derived from what the binary links. The man page and completions come from
# the binary itself (`outbox-relay man`, `outbox-relay completions SHELL`) when it has those
# commands. Needs dpkg-deb and strip (binutils); dpkg-shlibdeps (dpkg-dev) when present.
#
# Usage: scripts/package.sh [--skip-build]   (--skip-build packages the binary already in
# ${CARGO_TARGET_DIR:-target}/release). DEB_MAINTAINER overrides the package's Maintainer.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SKIP_BUILD=
for arg in "$@"; do
  case "$arg" in
    --skip-build) SKIP_BUILD=1 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (usage: scripts/package.sh [--skip-build])" >&2; exit 2 ;;
  esac
done

die() { echo "package.sh: $*" >&2; exit 1; }
for tool in dpkg-deb strip tar gzip sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (Debian: apt-get install dpkg binutils)"
done

# The root crate's version: the first `version =` after the top-level [package] header.
VERSION=$(awk '/^\[package\]/ {p = 1; next} /^\[/ {p = 0} p && /^version *=/ {
  gsub(/.*= *"|".*/, ""); print; exit }' Cargo.toml)
[ -n "$VERSION" ] || die "no version in Cargo.toml's [package]"
DESCRIPTION=$(awk '/^\[package\]/ {p = 1; next} /^\[/ {p = 0} p && /^description *=/ {
  sub(/^description *= *"/, ""); sub(/" *$/, ""); print; exit }' Cargo.toml)
DEB_REVISION=1
ARCH_TRIPLE=x86_64-linux-gnu
DEB_ARCH=amd64
[ "$(uname -m)" = x86_64 ] || die "this script packages x86_64 builds only (this is $(uname -m))"
MAINTAINER="${DEB_MAINTAINER:-outbox-relay maintainers <maintainers@outbox-relay.invalid>}"

TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET_DIR/release/outbox-relay"
if [ -z "$SKIP_BUILD" ]; then
  echo "== cargo build --release --locked --bin outbox-relay (target dir: $TARGET_DIR)"
  cargo build --release --locked --bin outbox-relay
fi
[ -x "$BIN" ] || die "$BIN not found: build it, or run without --skip-build"
BUILT_VERSION=$("$BIN" --version) || die "$BIN --version failed"
case "$BUILT_VERSION" in
  "outbox-relay $VERSION" | "outbox-relay $VERSION "*) ;;
  *) die "$BIN reports '$BUILT_VERSION', Cargo.toml says $VERSION: a stale build? run without --skip-build" ;;
esac

# Every archived file's time is the last commit's (or now, outside git), unless
# SOURCE_DATE_EPOCH is set. It is set only after the build: build scripts in the tree (cc's,
# hence ring's, openssl-sys's, libz-sys's) rerun when it changes, so a per-commit value would
# rebuild most dependencies on every commit. The binary's build date is thus when it was built.
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
export SOURCE_DATE_EPOCH
umask 022
DIST="$ROOT/dist"
mkdir -p "$DIST"
WORK=$(mktemp -d /tmp/outbox-relay-package.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# --- The stripped binary, the man page and the completions, made once for both artefacts.
STRIPPED="$WORK/outbox-relay"
strip --strip-unneeded -o "$STRIPPED" "$BIN"
chmod 0755 "$STRIPPED"
GEN="$WORK/generated"
mkdir -p "$GEN"
HAVE_MAN= HAVE_COMPLETIONS=
if "$STRIPPED" man >/dev/null 2>&1; then
  "$STRIPPED" man > "$GEN/outbox-relay.1"
  [ -s "$GEN/outbox-relay.1" ] && HAVE_MAN=1
fi
if "$STRIPPED" completions bash >/dev/null 2>&1; then
  "$STRIPPED" completions bash > "$GEN/outbox-relay.bash"
  "$STRIPPED" completions zsh > "$GEN/_outbox-relay"
  "$STRIPPED" completions fish > "$GEN/outbox-relay.fish"
  HAVE_COMPLETIONS=1
fi
[ -n "$HAVE_MAN" ] || echo "note: this build has no 'outbox-relay man': no man page packaged"
[ -n "$HAVE_COMPLETIONS" ] || echo "note: this build has no 'outbox-relay completions': none packaged"
DOCS=(README.md)
for f in LICENSE CHANGELOG.md; do
  if [ -f "$f" ]; then DOCS+=("$f"); else echo "note: no $f in the repository: not packaged"; fi
done

# --- The tarball.
NAME="outbox-relay-$VERSION"
TAR_ROOT="$WORK/tar/$NAME"
install -d "$TAR_ROOT/bin" "$TAR_ROOT/config" "$TAR_ROOT/migrations"
install -m 0755 "$STRIPPED" "$TAR_ROOT/bin/outbox-relay"
install -m 0644 "${DOCS[@]}" "$TAR_ROOT/"
install -m 0644 config/*.toml "$TAR_ROOT/config/"
install -m 0644 migrations/*.sql "$TAR_ROOT/migrations/"
if [ -n "$HAVE_MAN" ]; then
  install -D -m 0644 "$GEN/outbox-relay.1" "$TAR_ROOT/share/man/man1/outbox-relay.1"
fi
if [ -n "$HAVE_COMPLETIONS" ]; then
  install -d "$TAR_ROOT/share/completions"
  install -m 0644 "$GEN/outbox-relay.bash" "$GEN/_outbox-relay" "$GEN/outbox-relay.fish" \
    "$TAR_ROOT/share/completions/"
fi
TARBALL="$NAME-$ARCH_TRIPLE.tar.gz"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
  -C "$WORK/tar" -cf - "$NAME" | gzip -9 -n > "$DIST/$TARBALL"
(cd "$DIST" && sha256sum "$TARBALL" > "$TARBALL.sha256")
echo "== dist/$TARBALL"

# --- The Debian package, from a staged tree.
DEB_VERSION="$VERSION-$DEB_REVISION"
DEB="outbox-relay_${DEB_VERSION}_$DEB_ARCH.deb"
PKG="$WORK/deb"
install -d "$PKG/DEBIAN" "$PKG/usr/bin" "$PKG/usr/share/outbox-relay/config" \
  "$PKG/usr/share/outbox-relay/migrations" "$PKG/usr/share/doc/outbox-relay"
install -m 0755 "$STRIPPED" "$PKG/usr/bin/outbox-relay"
install -m 0644 config/*.toml "$PKG/usr/share/outbox-relay/config/"
install -m 0644 migrations/*.sql "$PKG/usr/share/outbox-relay/migrations/"
install -m 0644 README.md "$PKG/usr/share/doc/outbox-relay/README.md"
[ -f CHANGELOG.md ] && install -m 0644 CHANGELOG.md "$PKG/usr/share/doc/outbox-relay/CHANGELOG.md"
cat > "$PKG/usr/share/doc/outbox-relay/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: outbox-relay

Files: *
Copyright: the outbox-relay contributors
License: Apache-2.0
 Licensed under the Apache License, Version 2.0. On Debian systems, the full text of the
 Apache License 2.0 is in /usr/share/common-licenses/Apache-2.0.
Comment: /usr/bin/outbox-relay also contains, statically linked, librdkafka (BSD-2-Clause)
 and the Rust crates listed in the source's Cargo.lock, each under its own license (for most,
 MIT or Apache-2.0).
EOF
if [ -n "$HAVE_MAN" ]; then
  install -d "$PKG/usr/share/man/man1"
  gzip -9 -n -c "$GEN/outbox-relay.1" > "$PKG/usr/share/man/man1/outbox-relay.1.gz"
  chmod 0644 "$PKG/usr/share/man/man1/outbox-relay.1.gz"
fi
if [ -n "$HAVE_COMPLETIONS" ]; then
  install -D -m 0644 "$GEN/outbox-relay.bash" "$PKG/usr/share/bash-completion/completions/outbox-relay"
  install -D -m 0644 "$GEN/_outbox-relay" "$PKG/usr/share/zsh/vendor-completions/_outbox-relay"
  install -D -m 0644 "$GEN/outbox-relay.fish" "$PKG/usr/share/fish/vendor_completions.d/outbox-relay.fish"
fi

# Depends: from the libraries the binary links, as dpkg-shlibdeps derives them (with the
# minimum versions of the symbols it uses); without dpkg-dev, by mapping each library the
# binary names (DT_NEEDED) to the package that owns it, as ldd resolves it, with libc6's
# minimum from the newest GLIBC_ symbol version it uses.
derive_depends() {
  local bin=$1
  if command -v dpkg-shlibdeps >/dev/null 2>&1; then
    local dir
    dir=$(mktemp -d "$WORK/shlibdeps.XXXXXX")
    mkdir -p "$dir/debian"
    printf 'Source: outbox-relay\n\nPackage: outbox-relay\nArchitecture: any\n' > "$dir/debian/control"
    (cd "$dir" && dpkg-shlibdeps -O "$bin" 2>/dev/null) | sed -n 's/^shlibs:Depends=//p'
    return
  fi
  local pkgs=() lib path pkg glibc candidate
  # The libraries the binary names itself (DT_NEEDED), not those they pull in.
  for lib in $(objdump -p "$bin" | awk '$1 == "NEEDED" {print $2}'); do
    path=$(ldd "$bin" | awk -v lib="$lib" '$1 == lib && $2 == "=>" {print $3}')
    case "$lib" in ld-linux*) continue ;; esac
    [ -n "$path" ] && [ "$path" != "not" ] || die "$lib (needed by $bin) is not on this machine"
    # With merged /usr, ldd's path, its target and dpkg's record of it can differ in /usr.
    pkg=
    for candidate in "$path" "$(readlink -f "$path")" "${path#/usr}" "/usr${path#/usr}"; do
      pkg=$(dpkg -S "$candidate" 2>/dev/null | head -n1 | cut -d: -f1) && [ -n "$pkg" ] && break
    done
    [ -n "$pkg" ] || die "no package owns $path (linked by $bin)"
    pkgs+=("$pkg")
  done
  glibc=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
  printf '%s\n' "${pkgs[@]}" | sort -u | sed "s/^libc6\$/libc6 (>= $glibc)/" | paste -sd, - | sed 's/,/, /g'
}
DEPENDS=$(derive_depends "$PKG/usr/bin/outbox-relay")
[ -n "$DEPENDS" ] || die "could not derive Depends for usr/bin/outbox-relay"
INSTALLED_SIZE=$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)
cat > "$PKG/DEBIAN/control" <<EOF
Package: outbox-relay
Version: $DEB_VERSION
Architecture: $DEB_ARCH
Maintainer: $MAINTAINER
Installed-Size: $INSTALLED_SIZE
Depends: $DEPENDS
Recommends: ca-certificates
Section: net
Priority: optional
Description: transactional outbox relay from PostgreSQL to message brokers
$(fold -s -w 78 <<<"$DESCRIPTION" | sed 's/ *$//; s/^/ /')
 .
 outbox-relay reads outbox tables through PostgreSQL logical replication and
 publishes each row to Kafka, RabbitMQ, Amazon EventBridge, files or stdout.
 Example configurations and the outbox table's SQL are in
 /usr/share/outbox-relay.
EOF
(cd "$PKG" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
  | xargs -0 md5sum > DEBIAN/md5sums)
chmod 0644 "$PKG/DEBIAN/control" "$PKG/DEBIAN/md5sums"
find "$PKG" -type d -exec chmod 0755 {} +
find "$PKG" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
dpkg-deb --build --root-owner-group -Zxz "$PKG" "$DIST/$DEB" >/dev/null
(cd "$DIST" && sha256sum "$DEB" > "$DEB.sha256")

# Sanity checks on what was written (listings read in full: grep -q would cut the pipe).
dpkg-deb --info "$DIST/$DEB" >/dev/null || die "dpkg-deb --info fails on $DEB"
DEB_LIST=$(dpkg-deb --contents "$DIST/$DEB" | awk '{print $6}')
TAR_LIST=$(tar -tzf "$DIST/$TARBALL")
for path in ./usr/bin/outbox-relay ./usr/share/outbox-relay/config/stdout.toml \
  ./usr/share/outbox-relay/migrations/001_outbox_table.sql ./usr/share/doc/outbox-relay/copyright \
  ${HAVE_MAN:+./usr/share/man/man1/outbox-relay.1.gz} \
  ${HAVE_COMPLETIONS:+./usr/share/bash-completion/completions/outbox-relay}; do
  grep -qxF "$path" <<<"$DEB_LIST" || die "$DEB lacks $path"
done
[ "$(dpkg-deb --field "$DIST/$DEB" Version)" = "$DEB_VERSION" ] || die "$DEB has the wrong Version"
for path in bin/outbox-relay README.md config/stdout.toml migrations/001_outbox_table.sql \
  ${HAVE_MAN:+share/man/man1/outbox-relay.1} ${HAVE_COMPLETIONS:+share/completions/outbox-relay.bash}; do
  grep -qxF "$NAME/$path" <<<"$TAR_LIST" || die "$TARBALL lacks $NAME/$path"
done
echo "== dist/$DEB (Depends: $DEPENDS)"
(cd "$DIST" && ls -l "$TARBALL" "$TARBALL.sha256" "$DEB" "$DEB.sha256")
