#!/bin/sh
# Serve a mounted backbone / zoo when one is there, else the embedded defaults.
set -e
if [ -z "${CDD_BACKBONE:-}" ] && [ -f /models/backbone/model_index.json ]; then
  export CDD_BACKBONE=/models/backbone
fi
if [ -z "${CDD_ZOO:-}" ] && [ -n "$(find /models/zoo -mindepth 2 -maxdepth 2 -name manifest.json 2>/dev/null | head -n 1)" ]; then
  export CDD_ZOO=/models/zoo
fi
exec cdd-serve "$@"
