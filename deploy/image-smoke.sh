#!/usr/bin/env bash
# Proves the container image's runtime layout offline, without a registry or a Docker engine.
#
# deploy/Dockerfile needs the official Rust image and distroless, which this network cannot pull,
# so this script assembles the same runtime stage from the host: a FROM-scratch image (buildah)
# holding the binary at the Dockerfile's ENTRYPOINT path, the shared libraries `ldd` lists, and a
# CA bundle at /etc/ssl/certs/ca-certificates.crt (where distroless keeps it and where
# rustls-native-certs looks). It then runs that image with podman as uid 65532 on a read-only root
# filesystem with no tmpfs at all, all capabilities dropped, and forwards one request to a local
# mutual-TLS upstream (openssl s_server, which refuses a handshake without a client certificate and
# echoes the certificate it received). The upstream's CA is trusted only through the image's CA
# bundle (no --ca-file), so the request proves the binary starts, finds its libraries and the
# system trust store, reads a read-only identity mount, and presents the client certificate.
#
#   deploy/image-smoke.sh [BINARY]      default: target/release/vero-proxy (built when missing)
#
# Needs root, buildah, podman, runc, openssl and curl (.ci/run installs them). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:-target/release/vero-proxy}
if [[ ! -x $bin ]]; then
  cargo build --release --locked
fi
bin=$(realpath "$bin")
for tool in buildah podman runc openssl curl ldd python3; do
  command -v "$tool" >/dev/null || { echo "image-smoke: $tool is not installed" >&2; exit 1; }
done

# The runtime stage of deploy/Dockerfile decides the paths and the user.
entrypoint=$(sed -n 's/^ENTRYPOINT \["\([^"]*\)".*/\1/p' deploy/Dockerfile | tail -n 1)
user=$(sed -n 's/^USER \([0-9:]*\)$/\1/p' deploy/Dockerfile | tail -n 1)
[[ -n $entrypoint && -n $user ]] || { echo "image-smoke: no ENTRYPOINT/USER in deploy/Dockerfile" >&2; exit 1; }

work=$(mktemp -d)
name=vero-proxy-smoke-$$
image=localhost/vero-proxy-smoke:$$
ctr=
upstream_pid=
cleanup() {
  set +e
  podman rm -f "$name" >/dev/null 2>&1
  [[ -n $ctr ]] && buildah rm "$ctr" >/dev/null 2>&1
  podman rmi -f "$image" >/dev/null 2>&1
  [[ -n $upstream_pid ]] && kill "$upstream_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# A throwaway PKI: one CA for the upstream's server certificate and the client certificate.
cd "$work"
subj_client="/CN=1234567-1/O=Image Smoke Oy/C=FI"
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 30 -subj "/CN=image smoke CA" 2>/dev/null
openssl req -new -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -out server.pem \
  -extfile <(printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n') 2>/dev/null
mkdir tls
openssl req -new -newkey rsa:2048 -nodes -keyout tls/tls.key -out client.csr -subj "$subj_client" 2>/dev/null
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -out tls/tls.crt \
  -extfile <(printf 'extendedKeyUsage=clientAuth\n') 2>/dev/null
# As a Kubernetes Secret with defaultMode 0440 and fsGroup 65532 would present them.
chown -R "root:${user#*:}" tls
chmod 0750 tls
chmod 0440 tls/tls.crt tls/tls.key

upstream_port=$(free_port)
openssl s_server -accept "127.0.0.1:$upstream_port" -cert server.pem -key server.key \
  -CAfile ca.pem -Verify 1 -verify_return_error -www -quiet >upstream.log 2>&1 &
upstream_pid=$!

# The image: binary, its libraries (with their modes: the loader must be executable), CA bundle.
ctr=$(buildah from scratch)
root=$(buildah mount "$ctr")
install -D -m 0755 "$bin" "$root$entrypoint"
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  install -D -m 0755 "$(realpath "$lib")" "$root$lib"
done
install -d -m 0755 "$root/etc/ssl/certs"
cat /etc/ssl/certs/ca-certificates.crt ca.pem >"$root/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$root/etc/ssl/certs/ca-certificates.crt"
install -d -m 1777 "$root/tmp"
buildah umount "$ctr" >/dev/null
buildah config --user "$user" --entrypoint "[\"$entrypoint\"]" --port 8080 --port 9901 "$ctr"
buildah commit -q "$ctr" "$image" >/dev/null
buildah rm "$ctr" >/dev/null
ctr=
echo "image-smoke: built $image from $bin ($(ldd "$bin" | grep -c '/') libraries from ldd)"

listen_port=$(free_port)
admin_port=$(free_port)
# runc, not crun: crun refuses hosts with hybrid cgroups. Explicit ulimits: podman would otherwise
# raise them, which needs CAP_SYS_RESOURCE (nproc above 4096 was refused here even below the host's
# hard limit). --network host: the upstream is on the host's loopback.
podman run -d --name "$name" --runtime runc \
  --ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit nproc=4096:4096 \
  --network host --read-only --read-only-tmpfs=false \
  --cap-drop ALL --security-opt no-new-privileges \
  -v "$work/tls:/etc/vero-proxy/tls:ro" \
  "$image" \
  --upstream "https://localhost:$upstream_port" --identity-dir /etc/vero-proxy/tls \
  --listen "127.0.0.1:$listen_port" --admin-listen "127.0.0.1:$admin_port" \
  --upstream-protocol http1 --reload-interval 0 >/dev/null

fail() {
  echo "image-smoke: FAILED: $*" >&2
  podman logs "$name" >&2 || true
  exit 1
}

ready=
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1; then ready=1; break; fi
  [[ $(podman inspect -f '{{.State.Running}}' "$name") == true ]] || fail "the container exited"
  sleep 0.1
done
[[ -n $ready ]] || fail "/readyz did not answer 200 within 10 s"

pid=$(podman inspect -f '{{.State.Pid}}' "$name")
uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
[[ $uid == "${user%%:*}" ]] || fail "the proxy runs as uid $uid, not ${user%%:*}"

body=$(curl -sS -w '\n%{http_code}' "http://127.0.0.1:$listen_port/")
status=${body##*$'\n'}
[[ $status == 200 ]] || fail "GET / through the proxy answered $status"
grep -q "Subject: CN=1234567-1, O=Image Smoke Oy, C=FI" <<<"$body" ||
  fail "the upstream did not report our client certificate"
echo "image-smoke: ok: uid $uid, read-only rootfs, no tmpfs, all capabilities dropped;" \
  "GET / reached the mTLS upstream with subject ${subj_client}"
