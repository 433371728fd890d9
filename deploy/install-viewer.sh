#!/usr/bin/env bash
# Installs the web viewer the node serves under /viewer: OHIF Viewer
# (@ohif/app on the npm registry), one pinned version whose tarball is
# verified against the registry's sha512 integrity before a byte of it is
# unpacked, then prepared to live under /viewer/ instead of the site root.
#
#   deploy/install-viewer.sh [DEST]
#
# DEST defaults to $HUREN_VIEWER_DIR, else ./huren-data/viewer (the node's
# default `viewer_dir`: <data_dir>/viewer). Idempotent: a DEST that already
# holds this version (its .huren-viewer stamp says so) is left alone; the
# tarball is cached in ${HUREN_CACHE:-$HOME/.cache/huren-ci}/ohif and
# re-verified on every run. Needs curl, tar, openssl (or sha512sum+base64).
#
# What "prepared" means: OHIF's production build assumes it is served at
# "/": index.html names its scripts and styles as /app.bundle…js, sets
# window.PUBLIC_URL="/", and every webpack runtime in the bundles has its
# public path fixed to "/" (chunks, workers and wasm are loaded from there).
# Its stylesheet names a font from "/" too.
# Each of those is rewritten to /viewer/, and the count of rewrites checked:
# a future version built differently fails here, not in a doctor's browser.
# The shipped app-config.js (it points at OHIF's public demo server) is
# removed: the node generates /viewer/app-config.js itself, reading the
# node's own DICOMweb.
set -euo pipefail

OHIF_VERSION=3.13.2
# `npm view @ohif/app@3.13.2 dist.integrity`
OHIF_INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
OHIF_TARBALL_URL="https://registry.npmjs.org/@ohif/app/-/app-$OHIF_VERSION.tgz"
BASE_PATH=/viewer/

DEST="${1:-${HUREN_VIEWER_DIR:-./huren-data/viewer}}"
CACHE="${HUREN_CACHE:-$HOME/.cache/huren-ci}/ohif"
STAMP="ohif $OHIF_VERSION $OHIF_INTEGRITY base $BASE_PATH rewrite 2"

log() { echo "[install-viewer] $*" >&2; }
die() { echo "[install-viewer] ERROR: $*" >&2; exit 1; }

if [[ -f "$DEST/.huren-viewer" && "$(cat "$DEST/.huren-viewer")" == "$STAMP" && -f "$DEST/index.html" ]]; then
    log "OHIF $OHIF_VERSION already installed in $DEST"
    exit 0
fi

sha512_b64() {
    if command -v openssl >/dev/null; then
        openssl dgst -sha512 -binary "$1" | base64 -w0
    else
        sha512sum "$1" | cut -d' ' -f1 | xxd -r -p | base64 -w0
    fi
}

mkdir -p "$CACHE"
tarball="$CACHE/app-$OHIF_VERSION.tgz"
if [[ ! -f "$tarball" || "sha512-$(sha512_b64 "$tarball")" != "$OHIF_INTEGRITY" ]]; then
    log "downloading $OHIF_TARBALL_URL"
    curl -fsSL --retry 3 -o "$tarball.part" "$OHIF_TARBALL_URL"
    mv "$tarball.part" "$tarball"
fi
actual="sha512-$(sha512_b64 "$tarball")"
if [[ "$actual" != "$OHIF_INTEGRITY" ]]; then
    rm -f "$tarball"
    die "integrity mismatch for $tarball: expected $OHIF_INTEGRITY, got $actual (removed)"
fi
log "verified $OHIF_INTEGRITY"

# Unpacked beside DEST and renamed into place: a node serving DEST never
# sees half a viewer.
parent="$(dirname "$DEST")"
mkdir -p "$parent"
staging="$(mktemp -d "$parent/.viewer-install.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
tar -xzf "$tarball" -C "$staging" package/dist
dist="$staging/package/dist"
[[ -f "$dist/index.html" ]] || die "no dist/index.html in @ohif/app $OHIF_VERSION"

# Rewrites FILE with python's str.replace and checks how often OLD occurred.
rewrite() {  # FILE OLD NEW MIN_COUNT
    python3 - "$@" <<'PY' || die "rewrite of $1 failed"
import sys
path, old, new, least = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open(path, encoding="utf-8") as f:
    text = f.read()
n = text.count(old)
if n < least:
    sys.exit(f"{path}: {old!r} found {n} times, expected at least {least}")
with open(path, "w", encoding="utf-8") as f:
    f.write(text.replace(old, new))
PY
}

rewrite "$dist/index.html" 'window.PUBLIC_URL="/"' "window.PUBLIC_URL=\"$BASE_PATH\"" 1
rewrite "$dist/index.html" 'src="/' "src=\"$BASE_PATH" 3
rewrite "$dist/index.html" 'href="/' "href=\"$BASE_PATH" 2
runtimes=0
while IFS= read -r -d '' js; do
    if grep -q '__webpack_require__.p = "/";' "$js"; then
        rewrite "$js" '__webpack_require__.p = "/";' "__webpack_require__.p = \"$BASE_PATH\";" 1
        runtimes=$((runtimes + 1))
    fi
done < <(find "$dist" -maxdepth 1 -name '*.js' -print0)
((runtimes >= 1)) || die "no webpack public path found in the bundles of @ohif/app $OHIF_VERSION"
# Fonts named from the site root in the stylesheets.
while IFS= read -r -d '' css; do
    if grep -q 'url(/' "$css"; then
        rewrite "$css" 'url(/' "url($BASE_PATH" 1
    fi
done < <(find "$dist" -maxdepth 1 -name '*.css' -print0)
log "public path set to $BASE_PATH in index.html, the stylesheets and $runtimes webpack runtimes"
rm -f "$dist/app-config.js" "$dist/_redirects" "$dist/_headers" "$dist/serve.json"
echo "$STAMP" >"$dist/.huren-viewer"

if [[ -e "$DEST" ]]; then
    old="$(mktemp -d "$parent/.viewer-old.XXXXXX")"
    mv "$DEST" "$old/"
    mv "$dist" "$DEST"
    rm -rf "$old"
else
    mv "$dist" "$DEST"
fi
log "OHIF $OHIF_VERSION installed in $DEST"
