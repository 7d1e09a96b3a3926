#!/usr/bin/env bash
# Throughput while the client certificate is rotated every second, against the steady rate,
# and the requests lost meanwhile. Loopback only; bounded in time (about 30 s of load).
#
#   bench/rotation.sh            # needs nginx, wrk, openssl (installed with apt-get if missing)
#
# Layout: vero-proxy pinned to CPU 0; nginx (the mTLS upstream, ssl_verify_client on) and wrk
# on CPU 1. PROTO=auto for HTTP/2 to the upstream (default http1). The identity is a Kubernetes-style secret volume (..data symlink swapped), so the
# reload is driven by file events, as in a pod.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SECS:-10}
conns=${CONNS:-64}

. bench/lib.sh
need nginx wrk openssl -- nginx-light wrk openssl
bench_start

# Test PKI: one CA, a server certificate for localhost, 12 client certificates.
make_ca ec -pkeyopt ec_paramgen_curve:P-256
issue server "/CN=localhost" "subjectAltName=DNS:localhost"
for i in $(seq 0 11); do issue "client$i" "/CN=1234567-1/O=Bench Oy/C=FI" "extendedKeyUsage=clientAuth"; done

port=$((20000 + RANDOM % 20000))
serial_upstream "$port" "ssl http2"

# The identity as a Kubernetes secret volume mounts it.
publish vol 0 client0.pem client0.key

listen=127.0.0.1:$((port + 1))
VERO_PROXY_LOG=warn taskset -c 0 "$bin" --listen "$listen" --admin-listen 127.0.0.1:$((port + 2)) \
  --upstream "https://localhost:$port" --identity-dir vol --ca-file ca.pem \
  --max-upstream-concurrency $((conns * 2)) --upstream-protocol "${PROTO:-http1}" 2> proxy.log & pids+=($!)
for _ in $(seq 100); do curl -fs "http://$listen/x" -o /dev/null && break; sleep 0.1; done

run_wrk() { taskset -c 1 wrk -t1 -c"$conns" -d"${secs}s" --latency "http://$listen/x"; }

run_wrk > steady.txt
: > access.log
run_wrk > rotating.txt &
wrk_pid=$!
for i in $(seq 1 $((secs - 1))); do sleep 1; publish vol "$i" "client$i.pem" "client$i.key"; done
wait "$wrk_pid"

steady=$(rate steady.txt); rotating=$(rate rotating.txt)
identities=$(sort -u access.log | wc -l)
echo
echo "| phase | requests/s | failed requests | client certificates seen upstream |"
echo "|---|---|---|---|"
echo "| steady | $steady | $(bad steady.txt) | 1 |"
echo "| rotating every 1 s | $rotating | $(bad rotating.txt) | $identities |"
awk -v a="$rotating" -v b="$steady" 'BEGIN { printf "\nthroughput while rotating: %.0f%% of steady (target: 90%% or more)\n", 100 * a / b }'
echo "$(nproc) CPUs, $(uname -m), vero-proxy on CPU 0, nginx and wrk on CPU 1, $conns connections, 2 KiB answers, upstream protocol ${PROTO:-http1}"
