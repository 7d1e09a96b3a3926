#!/bin/sh
# vero-proxy renewal, step 3 of 3 (the only container with API access, and that only to the
# two Secrets named here):
#  - a pair `cert renew` has just written to $WORK_DIR/next goes into the -next Secret, which
#    the proxy mounts as its next identity (--next-identity-dir) and puts into service when
#    it is safe (Vero API fetches a renewed production certificate once a day);
#  - a pair staged at least $PROMOTE_AFTER_HOURS hours ago is promoted into the main Secret,
#    and the -next Secret is emptied. The proxy's /status answers loopback peers only, so the
#    job goes by time: 36 h is past the proxy's activation delay (24 h from notBefore), which
#    puts the staged pair into service whatever its probe says.
set -eu
: "${SECRET:?the main identity Secret's name}"
: "${NEXT_SECRET:?the -next Secret's name}"
work=${WORK_DIR:-/work}
hours=${PROMOTE_AFTER_HOURS:-36}
now=$(date +%s)
patch=$work/patch.json
umask 077

b64() { base64 <"$1" | tr -d '\n'; }

if [ -s "$work/next/cert.pem" ] && [ -s "$work/next/key.pem" ]; then
  printf '{"metadata":{"annotations":{"vero-proxy.example.com/staged-at":"%s"}},' "$now" >"$patch"
  printf '"data":{"tls.crt":"%s","tls.key":"%s"}}' \
    "$(b64 "$work/next/cert.pem")" "$(b64 "$work/next/key.pem")" >>"$patch"
  kubectl patch secret "$NEXT_SECRET" --type=merge --patch-file="$patch"
  rm -f "$patch"
  echo "publish: staged the renewed pair in Secret $NEXT_SECRET; promotion into $SECRET in $hours h"
  exit 0
fi

staged_at=$(kubectl get secret "$NEXT_SECRET" \
  -o 'jsonpath={.metadata.annotations.vero-proxy\.example\.com/staged-at}')
if [ -z "$staged_at" ]; then
  echo "publish: no renewed pair, nothing staged: nothing to do"
  exit 0
fi
case $staged_at in
  *[!0-9]*)
    echo "publish: $NEXT_SECRET's staged-at annotation is not a time: $staged_at" >&2
    exit 1
    ;;
esac
age=$((now - staged_at))
if [ "$age" -lt $((hours * 3600)) ]; then
  echo "publish: the pair in $NEXT_SECRET was staged $((age / 3600)) h ago; promoting it after $hours h"
  exit 0
fi

crt=$(kubectl get secret "$NEXT_SECRET" -o 'jsonpath={.data.tls\.crt}')
key=$(kubectl get secret "$NEXT_SECRET" -o 'jsonpath={.data.tls\.key}')
if [ -z "$crt" ] || [ -z "$key" ]; then
  echo "publish: $NEXT_SECRET is marked staged but holds no tls.crt and tls.key" >&2
  exit 1
fi
printf '{"data":{"tls.crt":"%s","tls.key":"%s"}}' "$crt" "$key" >"$patch"
kubectl patch secret "$SECRET" --type=merge --patch-file="$patch"
rm -f "$patch"
kubectl patch secret "$NEXT_SECRET" --type=json -p \
  '[{"op":"remove","path":"/data"},{"op":"remove","path":"/metadata/annotations/vero-proxy.example.com~1staged-at"}]'
echo "publish: promoted the pair staged $((age / 3600)) h ago into Secret $SECRET and emptied $NEXT_SECRET"
