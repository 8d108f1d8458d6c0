#!/bin/sh
# As the official image's entrypoint: `server` gets its defaults in front of the caller's flags
# (-volume.max=0 only when the caller does not choose one), including volume preallocation.
if [ "$1" = server ]; then
  shift
  defaults="-dir=/data -volume.max=0 -master.volumePreallocate -master.volumeSizeLimitMB=1024"
  for arg in "$@"; do
    case "$arg" in -volume.max|-volume.max=*) defaults="-dir=/data -master.volumePreallocate -master.volumeSizeLimitMB=1024" ;; esac
  done
  # shellcheck disable=SC2086
  exec /usr/bin/weed server $defaults "$@"
fi
exec /usr/bin/weed "$@"
