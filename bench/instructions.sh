#!/usr/bin/env bash
# Instructions per request of vero-proxy under callgrind: a figure that does not move with the
# machine's load, for judging a hot-path change before bench/compare.sh times it.
#
#   bench/instructions.sh                        # 2 KiB answers, 64 connections x 150 requests
#   CONNS=1 PER=1500 LOG=info PROTO=auto bench/instructions.sh
#
# An mTLS nginx upstream on CPU 1 serves the answer from a directory vero-proxy does not watch;
# vero-proxy runs under valgrind on CPU 0. A Python client sends keep-alive GETs and reads every
# answer whole, so each request ends cleanly and the count is exact: a warm-up (every connection
# in the pool made), then the counters are zeroed, the measured requests run, and the counters
# are dumped. valgrind counts instructions of user space only (no kernel time), and a
# `rep movsb` copy once per byte. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-64} PER=${PER:-150} LOG=${LOG:-warn} PROTO=${PROTO:-http1} SIZE=${SIZE:-2k}
for t in valgrind nginx openssl curl python3; do
  command -v "$t" >/dev/null || { echo "bench/instructions.sh needs $t" >&2; exit 1; }
done
. bench/lib.sh
bench_start
make_ca rsa:2048
issue server "/CN=localhost" "subjectAltName=DNS:localhost"
issue client "/CN=1234567-1/O=Bench Oy/C=FI" "extendedKeyUsage=clientAuth"
mkdir -m 755 www
head -c 2048 /dev/zero | tr '\0' 'x' > www/2k
head -c 1048576 /dev/zero | tr '\0' 'x' > www/1m

base=$((20000 + RANDOM % 20000))
UP=$base PORT=$((base + 1)) ADMIN=$((base + 2))
cat > upstream.conf <<NGINX
worker_processes 1; error_log $work/upstream.err; pid $work/upstream.pid; daemon off;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000;
  client_body_temp_path $work/t1; proxy_temp_path $work/t2; fastcgi_temp_path $work/t3; uwsgi_temp_path $work/t4; scgi_temp_path $work/t5;
  server { listen 127.0.0.1:$UP ssl http2; ssl_protocols TLSv1.3;
    ssl_certificate $work/server.pem; ssl_certificate_key $work/server.key;
    ssl_client_certificate $work/ca.pem; ssl_verify_client on;
    location / { default_type application/json; root $work/www; } } }
NGINX
taskset -c 1 nginx -p "$work" -c "$work/upstream.conf" & pids+=($!)

cat > load.py <<'PY'
import asyncio, sys
port, conns, per, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: load\r\nAccept: */*\r\n\r\n".encode()
async def one():
    r, w = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(per):
        w.write(req)
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            sys.exit(f"unexpected answer: {head[:60]!r}")
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
        await r.readexactly(length)
    w.close()
    await w.wait_closed()
    return per
async def main():
    print(sum(await asyncio.gather(*[one() for _ in range(conns)])))
asyncio.run(main())
PY

# The log goes to a subdirectory: vero-proxy watches its certificate's directory (this one), and a
# log written there would wake that watch on every request and count as the access line's cost.
mkdir log
VERO_PROXY_LOG=$LOG taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
  "$bin" --upstream "https://localhost:$UP" --cert client.pem --key client.key --ca-file ca.pem \
  --max-upstream-concurrency 128 --admin-listen "127.0.0.1:$ADMIN" --listen "127.0.0.1:$PORT" \
  --upstream-protocol "$PROTO" > log/proxy.log 2>&1 &
vp=$!; pids+=($vp)
for _ in $(seq 600); do curl -fs -o /dev/null "http://127.0.0.1:$PORT/$SIZE" && break; sleep 0.1; done
taskset -c 1 python3 load.py "$PORT" "$CONNS" 20 "/$SIZE" > /dev/null
callgrind_control --zero "$vp" > /dev/null 2>&1
reqs=$(taskset -c 1 python3 load.py "$PORT" "$CONNS" "$PER" "/$SIZE")
callgrind_control --dump "$vp" > /dev/null 2>&1
dump=$(ls -t "$work"/callgrind.out.* | head -1)
ir=$(awk '/^summary:/ {print $2; exit}' "$dump")
echo "vero-proxy $("$bin" --version | cut -d' ' -f2), $SIZE answers, $CONNS connections, upstream $PROTO, log level $LOG:"
echo "$reqs requests, $ir instructions, $((ir / reqs)) per request"
if [[ -n ${KEEP:-} ]]; then cp "$dump" "$KEEP" && echo "callgrind profile: $KEEP (callgrind_annotate --inclusive=yes $KEEP)"; fi
