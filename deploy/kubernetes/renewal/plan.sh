#!/bin/sh
# vero-proxy renewal, step 1 of 3 (an init container without API access): point
# $WORK_DIR/current at the identity that `vero-proxy cert renew --if-due` checks.
#
# A pair already staged in the -next Secret is the newest certificate: its renewal window is
# two years away, so the certificate service is not asked again while it waits to be
# promoted. Without a staged pair it is the identity in service.
set -eu
work=${WORK_DIR:-/work}
current=${IDENTITY_DIR:-/identity}
next=${NEXT_IDENTITY_DIR:-/identity-next}

if [ -s "$next/tls.crt" ] && [ -s "$next/tls.key" ]; then
  ln -sfn "$next" "$work/current"
  echo "plan: a renewed pair is staged in $next; renewal is checked against it"
else
  ln -sfn "$current" "$work/current"
  echo "plan: nothing is staged; renewal is checked against the identity in service ($current)"
fi
