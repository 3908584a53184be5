#!/bin/sh
# The container's entrypoint: serve the backbone mounted at /models/backbone (else the embedded one) and
# the entries mounted at /models/zoo, cdd-serve's user zoo here (CDD_USER_ZOO), beside the embedded zoo's
# entries for that backbone; say which and why. A mounted folder this user cannot read stops the container
# with the reason, rather than quietly serving the defaults instead.
set -eu
BACKBONE=/models/backbone
ZOO=${CDD_USER_ZOO:-/models/zoo}

say() { echo "cdd-entrypoint: $*" >&2; }
die() { echo "cdd-entrypoint: ERROR: $*" >&2; exit 1; }
owner() { stat -c 'owner uid %u, mode %a' "$1"; }
ME="uid $(id -u)"
FIX="make it readable to $ME (chmod -R a+rX on the host) or run the container as its owner (--user / user:)"

# unreadable PATH: the first file or folder under PATH (PATH included) this user cannot read, with its owner
# and mode; nothing when all can be read.
unreadable() {
  bad=$(find "$1" \( ! -readable -o -type d ! -executable \) -print -quit 2>/dev/null)
  [ -z "$bad" ] || echo "$bad ($(owner "$bad"))"
}
entries() { find "$1" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -printf '%f\n' | sort | paste -sd ' ' -; }

if [ -n "${CDD_BACKBONE:-}" ]; then
  say "backbone: $CDD_BACKBONE (CDD_BACKBONE is set)"
elif [ -n "$(unreadable "$BACKBONE")" ]; then
  die "the backbone mounted at $BACKBONE cannot be read by $ME: $(unreadable "$BACKBONE"); $FIX"
elif [ -e "$BACKBONE/model_index.json" ]; then
  export CDD_BACKBONE="$BACKBONE"
  say "backbone: the one mounted at $BACKBONE"
else
  say "backbone: the embedded default ($BACKBONE has no model_index.json)"
fi

if [ -n "${CDD_ZOO:-}" ]; then
  say "zoo: $CDD_ZOO alone (CDD_ZOO is set)"
elif [ -n "$(unreadable "$ZOO")" ]; then
  die "the zoo mounted at $ZOO cannot be read by $ME: $(unreadable "$ZOO"); $FIX"
elif [ -n "$(entries "$ZOO")" ]; then
  say "zoo: the one mounted at $ZOO (entries: $(entries "$ZOO")), then the embedded zoo's entries made for" \
    "this backbone that no mounted entry's name shadows (CDD_ZOO=$ZOO serves the mounted one alone)"
else
  say "zoo: the embedded default ($ZOO has no entry folders)"
fi

exec cdd-serve "$@"
