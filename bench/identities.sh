#!/usr/bin/env bash
# Many organisations: N identities (default 1,000, RSA-2048 like the Tax Administration's) in one
# --identities-dir. Measures the time to load them at start-up, resident memory with all loaded
# and ACTIVE (default 50) in use under load, and the requests lost (of any organisation) while
# one organisation's identity is replaced under that load. Loopback only, bounded in time.
#
#   bench/identities.sh          # needs nginx, wrk, openssl (installed with apt-get if missing)
#
# Layout: vero-proxy pinned to CPU 0; nginx (the mTLS upstream, ssl_verify_client on) and wrk on
# CPU 1. Targets (issue 9): load under 2 s, RSS under 64 MiB, no request lost in the swap.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${IDENTITIES:-1000}
active=${ACTIVE:-50}
secs=${SECS:-10}
conns=${CONNS:-64}

. bench/lib.sh
need nginx wrk openssl python3 -- nginx-light wrk openssl python3
bench_start

# Business IDs with valid check digits: seven digits, weights 7 9 10 5 8 4 2, modulo 11.
ids() {
  python3 - "$1" <<'PY'
import sys
want, n, out = int(sys.argv[1]), 2000000, []
while len(out) < want:
    d = str(n); r = sum(int(c) * w for c, w in zip(d, [7, 9, 10, 5, 8, 4, 2])) % 11
    if r != 1:
        out.append(f"{d}-{0 if r == 0 else 11 - r}")
    n += 1
print("\n".join(out))
PY
}

echo "making a test CA and $n RSA-2048 client identities..." >&2
make_ca ec -pkeyopt ec_paramgen_curve:P-256
issue server "/CN=localhost" "subjectAltName=DNS:localhost"
printf 'extendedKeyUsage=clientAuth\n' > client.ext
ids "$n" > ids.txt
mkdir identities
make_identity() { # id dir
  mkdir -p "$2"
  openssl req -newkey rsa:2048 -nodes -keyout "$2/key.pem" -out "$2/req.csr" -subj "/CN=$1/O=Bench Oy/C=FI" 2>/dev/null
  openssl x509 -req -in "$2/req.csr" -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 8)" -days 2 \
    -extfile client.ext -out "$2/cert.pem" 2>/dev/null
  rm "$2/req.csr"; chmod 600 "$2/key.pem"
}
export -f make_identity
xargs -P "$(nproc)" -I{} bash -c 'make_identity {} identities/{}' < ids.txt

port=$((20000 + RANDOM % 20000))
serial_upstream "$port" "ssl"

listen=127.0.0.1:$((port + 1))
admin=127.0.0.1:$((port + 2))
started=$(date +%s%N)
VERO_PROXY_LOG=info taskset -c 0 "$bin" --listen "$listen" --admin-listen "$admin" \
  --upstream "https://localhost:$port" --identities-dir identities --ca-file ca.pem \
  --max-upstream-concurrency $((conns * 2)) --upstream-protocol http1 2> proxy.log & proxy=$!
pids+=($proxy)
first=$(head -1 ids.txt)
for _ in $(seq 500); do
  curl -fs -H "Vero-Proxy-Organisation: $first" "http://$listen/x" -o /dev/null && break
  sleep 0.01
done
served_ms=$((($(date +%s%N) - started) / 1000000))
load_ms=$(grep -o 'ms=[0-9]*' proxy.log | head -1 | cut -d= -f2)
loaded=$(grep -o 'loaded=[0-9]*' proxy.log | head -1 | cut -d= -f2)
rss_idle=$(awk '/VmRSS/ {print $2}' "/proc/$proxy/status")

# wrk spreads its requests over the first $active organisations by header.
head -"$active" ids.txt > active.txt
{
  echo 'local ids = {'
  sed 's/.*/"&",/' active.txt
  echo '}'
  cat <<'LUA'
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/x", { ["Vero-Proxy-Organisation"] = ids[(i % #ids) + 1], ["Host"] = "localhost" })
end
LUA
} > spread.lua
run_wrk() { taskset -c 1 wrk -t1 -c"$conns" -d"${secs}s" --latency -s spread.lua "http://$listen/"; }

run_wrk > steady.txt
rss_active=$(awk '/VmRSS/ {print $2}' "/proc/$proxy/status")

# Replace one active organisation's identity halfway through a second run.
swapped=$(sed -n 2p active.txt)
make_identity "$swapped" next
old_serial=$(openssl x509 -in "identities/$swapped/cert.pem" -noout -serial | cut -d= -f2)
new_serial=$(openssl x509 -in next/cert.pem -noout -serial | cut -d= -f2)
: > access.log
run_wrk > swapping.txt &
wrk_pid=$!
sleep $((secs / 2))
mv next/key.pem "identities/$swapped/key.pem.new"; mv next/cert.pem "identities/$swapped/cert.pem.new"
mv "identities/$swapped/key.pem.new" "identities/$swapped/key.pem"
mv "identities/$swapped/cert.pem.new" "identities/$swapped/cert.pem"
wait "$wrk_pid"
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$proxy/status")
certs_seen=$(sort -u access.log | wc -l)
new_seen=$(grep -ci "$new_serial" access.log || true)

echo
echo "| figure | value | target |"
echo "|---|---|---|"
echo "| identities loaded at start-up | $loaded of $n in ${load_ms} ms | under 2,000 ms |"
echo "| process start to first served request | ${served_ms} ms | |"
echo "| RSS with $n loaded, idle | $((rss_idle / 1024)) MiB | |"
echo "| RSS with $n loaded, $active in use ($conns connections) | $((rss_active / 1024)) MiB | under 64 MiB |"
echo "| peak RSS (VmHWM) over the whole run | $((hwm / 1024)) MiB | under 64 MiB |"
echo "| requests/s over $active organisations | $(rate steady.txt) | |"
echo "| failed requests while $swapped's identity was replaced | $(bad swapping.txt) of $(awk '/requests in/ {print $1}' swapping.txt) | 0 |"
echo "| requests with $swapped's new certificate after the swap | $new_seen | more than 0 |"
echo
echo "client certificates seen upstream during the swap run: $certs_seen; old serial $old_serial, new $new_serial"
echo "$(nproc) CPUs, $(uname -m), vero-proxy on CPU 0, nginx and wrk on CPU 1, HTTP/1.1 upstream, 2 KiB answers"
