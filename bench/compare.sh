#!/usr/bin/env bash
# vero-proxy against the tools people would use instead, at the same job on the same machine:
# nginx (proxy_ssl_certificate), HAProxy (server ... ssl crt) and stunnel (client = yes), all
# forwarding plain HTTP on loopback to one mTLS upstream (nginx, ssl_verify_client on).
# Per cell: requests/s, p50 and p99 latency, the proxy's CPU time per request and its peak RSS
# (VmHWM reset before each cell); per proxy: start to first served request, whole-run peak RSS.
#
#   bench/compare.sh                 # SECS=5 ROUNDS=3 by default; about 8 minutes
#
# Layout: every proxy pinned to CPU 0; the upstream and wrk to CPU 1. TLS 1.3, RSA-2048 client
# certificate, keep-alive, answers of 2 KiB and 1 MiB, 1 and 64 connections. Rounds interleave
# the proxies; medians are reported. Loopback only; every load is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}

. bench/lib.sh
need nginx haproxy stunnel4 wrk openssl curl -- nginx-light haproxy stunnel4 wrk openssl curl
bench_start

# --- PKI: a CA, the upstream's certificate for localhost, an RSA-2048 client certificate.
make_ca rsa:2048
issue server "/CN=localhost" "subjectAltName=DNS:localhost"
issue client "/CN=1234567-1/O=Bench Oy/C=FI" "extendedKeyUsage=clientAuth"
cat client.pem client.key > client-combined.pem
# The answers live apart from the identity files: vero-proxy watches its certificate's directory,
# and an upstream opening files there on every request would wake that watch each time.
mkdir -m 755 www
head -c 2048 /dev/zero | tr '\0' 'x' > www/2k
head -c 1048576 /dev/zero | tr '\0' 'x' > www/1m

base=$((20000 + RANDOM % 20000))
UP=$base P_NGINX=$((base + 1)) P_HAPROXY=$((base + 2)) P_STUNNEL=$((base + 3)) P_OURS=$((base + 4)) P_OURS2=$((base + 5))
temps() { printf 'client_body_temp_path %s/t1_%s; proxy_temp_path %s/t2_%s; fastcgi_temp_path %s/t3_%s; uwsgi_temp_path %s/t4_%s; scgi_temp_path %s/t5_%s;' \
  "$work" "$1" "$work" "$1" "$work" "$1" "$work" "$1" "$work" "$1"; }

# --- The upstream: nginx requiring client certificates, on CPU 1.
cat > upstream.conf <<NGINX
worker_processes 1; error_log $work/upstream.err; pid $work/upstream.pid; daemon off;
events { worker_connections 4096; }
http { access_log off; $(temps up) keepalive_requests 10000000;
  server { listen 127.0.0.1:$UP ssl http2; ssl_protocols TLSv1.3;
    ssl_certificate $work/server.pem; ssl_certificate_key $work/server.key;
    ssl_client_certificate $work/ca.pem; ssl_verify_client on;
    location /2k { default_type application/json; root $work/www; try_files /2k =404; }
    location /1m { default_type application/json; root $work/www; try_files /1m =404; } } }
NGINX
taskset -c 1 nginx -p "$work" -c "$work/upstream.conf" & pids+=($!)

# --- The peers, each the best version of itself for this job.
cat > nginx-proxy.conf <<NGINX
worker_processes 1; error_log $work/nginx-proxy.err; pid $work/nginx-proxy.pid; daemon off;
events { worker_connections 4096; }
http { access_log off; $(temps px)
  upstream up { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 10000000; }
  server { listen 127.0.0.1:$P_NGINX; keepalive_requests 10000000;
    location / { proxy_pass https://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_certificate $work/client.pem; proxy_ssl_certificate_key $work/client.key;
      proxy_ssl_trusted_certificate $work/ca.pem; proxy_ssl_verify on; proxy_ssl_name localhost;
      proxy_ssl_server_name on; proxy_ssl_session_reuse on; proxy_ssl_protocols TLSv1.3;
      proxy_buffering on; } } }
NGINX
cat > haproxy.cfg <<HAP
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 10s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:$P_HAPROXY
  default_backend be
backend be
  server up 127.0.0.1:$UP ssl crt $work/client-combined.pem ca-file $work/ca.pem verify required sni str(localhost) verifyhost localhost ssl-min-ver TLSv1.3 alpn http/1.1
HAP
cat > stunnel.conf <<STN
foreground = yes
pid =
[vero]
client = yes
accept = 127.0.0.1:$P_STUNNEL
connect = 127.0.0.1:$UP
cert = $work/client.pem
key = $work/client.key
CAfile = $work/ca.pem
verifyChain = yes
checkHost = localhost
sni = localhost
STN

start_nginx() { exec taskset -c 0 nginx -p "$work" -c "$work/nginx-proxy.conf"; }
start_haproxy() { exec taskset -c 0 haproxy -f "$work/haproxy.cfg"; }
start_stunnel() { exec taskset -c 0 stunnel4 "$work/stunnel.conf" 2>/dev/null; }
ours_args() { echo --upstream "https://localhost:$UP" --cert "$work/client.pem" --key "$work/client.key" --ca-file "$work/ca.pem" --max-upstream-concurrency 128 --admin-listen "127.0.0.1:$2" --listen "127.0.0.1:$1" --upstream-protocol "$3"; }
start_ours() { VERO_PROXY_LOG=warn exec taskset -c 0 "$bin" $(ours_args "$P_OURS" $((base + 6)) http1); }
start_ours2() { VERO_PROXY_LOG=warn exec taskset -c 0 "$bin" $(ours_args "$P_OURS2" $((base + 7)) auto); }

declare -A PORT=([nginx]=$P_NGINX [haproxy]=$P_HAPROXY [stunnel]=$P_STUNNEL [vero-proxy]=$P_OURS [vero-proxy-h2]=$P_OURS2)
declare -A PID
names=(nginx haproxy stunnel vero-proxy vero-proxy-h2)
startf() { case $1 in nginx) start_nginx ;; haproxy) start_haproxy ;; stunnel) start_stunnel ;; vero-proxy) start_ours ;; vero-proxy-h2) start_ours2 ;; esac; }

wait_up() { for _ in $(seq 400); do curl -fs -o /dev/null "http://127.0.0.1:$1/2k" && return 0; sleep 0.025; done; echo "port $1 never answered" >&2; return 1; }
now_ns() { date +%s%N; }

# Start to first served request, measured on fresh processes (3 each, median).
declare -A STARTMS
for n in "${names[@]}"; do
  ts=()
  for _ in 1 2 3; do
    t0=$(now_ns); startf "$n" > "$work/start-$n.out" 2>&1 & p=$!
    for _ in $(seq 2000); do curl -fs -o /dev/null "http://127.0.0.1:${PORT[$n]}/2k" && break; done
    t1=$(now_ns); ts+=($(( (t1 - t0) / 1000000 )))
    kill "$p" 2>/dev/null || { echo "$n did not start:" >&2; cat "$work"/*.err >&2 2>/dev/null; exit 1; }; wait "$p" 2>/dev/null || true
    for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:${PORT[$n]}/2k" || break; sleep 0.01; done
  done
  STARTMS[$n]=$(printf '%s\n' "${ts[@]}" | sort -n | sed -n 2p)
done

for n in "${names[@]}"; do startf "$n" > "$work/$n.out" 2>&1 & PID[$n]=$!; pids+=(${PID[$n]}); done
for n in "${names[@]}"; do wait_up "${PORT[$n]}"; done

# All processes of a proxy (nginx: master and worker).
procs() { local p=${PID[$1]}; echo "$p $(pgrep -P "$p" | tr '\n' ' ')"; }
cpu_ticks() { local s=0; for p in $(procs "$1"); do [[ -r /proc/$p/stat ]] && s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $s; }
hwm_kib() { local s=0; for p in $(procs "$1"); do [[ -r /proc/$p/status ]] && s=$((s + $(awk '/VmHWM/ {print $2}' "/proc/$p/status"))); done; echo $s; }
# Each cell's peak RSS starts from the RSS before it: `echo 5 > clear_refs` resets VmHWM. The peak
# each process reached before a reset is kept in HWM, so the whole-run peak is still their sum.
declare -A HWM
hwm_reset() {
  local p k
  for p in $(procs "$1"); do
    [[ -r /proc/$p/status ]] || continue
    k=$(awk '/VmHWM/ {print $2}' "/proc/$p/status")
    if ((k > ${HWM[$p]:-0})); then HWM[$p]=$k; fi
    echo 5 > "/proc/$p/clear_refs"
  done
}
whole_run_kib() { local s=0; hwm_reset "$1"; for p in $(procs "$1"); do s=$((s + ${HWM[$p]:-0})); done; echo $s; }
hz=$(getconf CLK_TCK)

declare -A RPS P50 P99 CPU RSS
cells=("2k 1" "2k 64" "1m 1" "1m 64")
for round in $(seq "$ROUNDS"); do
  for cell in "${cells[@]}"; do
    set -- $cell; size=$1; c=$2
    for n in "${names[@]}"; do
      key="$n|$size|$c"
      hwm_reset "$n"
      c0=$(cpu_ticks "$n")
      out=$(taskset -c 1 wrk -t1 -c"$c" -d"${SECS}s" --latency "http://127.0.0.1:${PORT[$n]}/$size")
      c1=$(cpu_ticks "$n")
      RSS[$key]+="$(hwm_kib "$n") "
      reqs=$(awk '/requests in/ {print $1}' <<<"$out")
      RPS[$key]+="$(awk '/Requests\/sec/ {print $2}' <<<"$out") "
      P50[$key]+="$(awk '$1 == "50%" {print $2}' <<<"$out") "
      P99[$key]+="$(awk '$1 == "99%" {print $2}' <<<"$out") "
      CPU[$key]+="$(awk -v t=$((c1 - c0)) -v hz="$hz" -v r="$reqs" 'BEGIN { printf "%.1f", t / hz * 1e6 / (r > 0 ? r : 1) }') "
      bad=$(awk '/Non-2xx/ {print $5}' <<<"$out"); [[ -z $bad ]] || echo "warning: $n $size x$c: $bad non-2xx answers" >&2
    done
  done
done

# wrk prints latencies with units; normalise to microseconds for the medians.
to_us() { awk '{ v=$1; if (v ~ /us$/) {sub(/us/,"",v); print v} else if (v ~ /ms$/) {sub(/ms/,"",v); print v*1000} else if (v ~ /s$/) {sub(/s/,"",v); print v*1e6} else print v }'; }
median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
lat() { for v in $1; do echo "$v" | to_us; done | tr '\n' ' ' | median; }
mib_max() { tr ' ' '\n' | sed '/^$/d' | sort -g | tail -1 | awk '{printf "%.1f", $1 / 1024}'; }

echo
echo "## vero-proxy and its peers, one run ($ROUNDS rounds x ${SECS}s per cell, medians; peak RSS: the highest round)"
echo
echo "| proxy | answer x conns | requests/s | p50 us | p99 us | proxy CPU us/request | peak RSS MiB |"
echo "|---|---|---|---|---|---|---|"
for cell in "${cells[@]}"; do
  set -- $cell
  for n in "${names[@]}"; do
    key="$n|$1|$2"
    printf '| %s | %s x %s | %.0f | %.0f | %.0f | %s | %s |\n' "$n" "$1" "$2" "$(echo "${RPS[$key]}" | median)" \
      "$(lat "${P50[$key]}")" "$(lat "${P99[$key]}")" "$(echo "${CPU[$key]}" | median)" "$(echo "${RSS[$key]}" | mib_max)"
  done
done
echo
echo "| proxy | peak RSS (VmHWM, all processes, whole run) | start to first served request |"
echo "|---|---|---|"
for n in "${names[@]}"; do printf '| %s | %.1f MiB | %s ms |\n' "$n" "$(awk -v k="$(whole_run_kib "$n")" 'BEGIN {print k/1024}')" "${STARTMS[$n]}"; done
echo
echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')); proxies on CPU 0, upstream nginx and wrk on CPU 1;"
echo "$(nginx -v 2>&1 | sed 's/.*: //'), $(haproxy -v | head -1 | cut -d' ' -f1-3), $(stunnel4 -version 2>&1 | grep -m1 -o 'stunnel [0-9.]*'), vero-proxy $("$bin" --version | cut -d' ' -f2)."
echo "vero-proxy: HTTP/1.1 to the upstream like the peers; vero-proxy-h2: --upstream-protocol auto (HTTP/2)."
echo "Identity rotation under load: bench/rotation.sh."
