#!/usr/bin/env bash
# vero-proxy against the tools people would use instead, at the same job on the same machine:
# nginx (proxy_ssl_certificate), HAProxy (server ... ssl crt) and stunnel (client = yes), all
# forwarding plain HTTP on loopback to one mTLS upstream (nginx, ssl_verify_client on).
# Per cell: requests/s, p50 and p99 latency, the proxy's CPU time per request and its peak RSS
# (VmHWM reset before each cell); per proxy: start to first served request, whole-run peak RSS.
# Then identity rotation under load, every proxy in turn: its client certificate in a
# Kubernetes-style secret volume swapped every second and the tool's own reload triggered (nginx
# and stunnel SIGHUP, HAProxy SIGUSR2 to its master-worker master, vero-proxy its file watch);
# requests/s against steady, failed requests, certificates the upstream saw, swap to first use.
#
#   bench/compare.sh                 # SECS=5 ROUNDS=3 ROT_SECS=11 ROT_ROUNDS=2 by default; about 13 minutes
#
# Layout: every proxy pinned to CPU 0; the upstream and wrk to CPU 1. TLS 1.3, RSA-2048 client
# certificate, keep-alive, answers of 2 KiB and 1 MiB, 1 and 64 connections. Rounds interleave
# the proxies; medians are reported. Rotation: 64 connections, 2 KiB, ROT_ROUNDS runs of ROT_SECS, a swap a
# second (ROT_SECS - 1 swaps). Loopback only; every load is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
ROT_SECS=${ROT_SECS:-11}
ROT_ROUNDS=${ROT_ROUNDS:-2}
SWAPS=$((ROT_SECS - 1))

. bench/lib.sh
need nginx haproxy stunnel4 wrk openssl curl -- nginx-light haproxy stunnel4 wrk openssl curl
bench_start

# --- PKI: a CA, the upstream's certificate for localhost, an RSA-2048 client certificate.
make_ca rsa:2048
issue server "/CN=localhost" "subjectAltName=DNS:localhost"
issue client "/CN=1234567-1/O=Bench Oy/C=FI" "extendedKeyUsage=clientAuth"
cat client.pem client.key > client-combined.pem
# The rotation phase's certificates: the same subject, each with its own serial.
declare -A SERIAL
for i in $(seq 0 "$SWAPS"); do
  issue "rot$i" "/CN=1234567-1/O=Bench Oy/C=FI" "extendedKeyUsage=clientAuth"
  SERIAL[$i]=$(openssl x509 -noout -serial -in "rot$i.pem" | cut -d= -f2)
done
# The answers live apart from the identity files: vero-proxy watches its certificate's directory,
# and an upstream opening files there on every request would wake that watch each time.
mkdir -m 755 www
head -c 2048 /dev/zero | tr '\0' 'x' > www/2k
head -c 1048576 /dev/zero | tr '\0' 'x' > www/1m

base=$((20000 + RANDOM % 20000))
UP=$base P_NGINX=$((base + 1)) P_HAPROXY=$((base + 2)) P_STUNNEL=$((base + 3)) P_OURS=$((base + 4)) P_OURS2=$((base + 5))
R=$((base + 8)) # the rotation phase's instances: R to R+4; their admin ports R+5, R+6
temps() { printf 'client_body_temp_path %s/t1_%s; proxy_temp_path %s/t2_%s; fastcgi_temp_path %s/t3_%s; uwsgi_temp_path %s/t4_%s; scgi_temp_path %s/t5_%s;' \
  "$work" "$1" "$work" "$1" "$work" "$1" "$work" "$1" "$work" "$1"; }

# --- The upstream: nginx requiring client certificates, on CPU 1.
cat > upstream.conf <<NGINX
worker_processes 1; error_log $work/upstream.err; pid $work/upstream.pid; daemon off;
events { worker_connections 4096; }
http { access_log off; $(temps up) keepalive_requests 10000000;
  log_format rot '\$msec \$ssl_client_serial';
  server { listen 127.0.0.1:$UP ssl http2; ssl_protocols TLSv1.3;
    ssl_certificate $work/server.pem; ssl_certificate_key $work/server.key;
    ssl_client_certificate $work/ca.pem; ssl_verify_client on;
    location /2k { default_type application/json; root $work/www; try_files /2k =404; }
    location /1m { default_type application/json; root $work/www; try_files /1m =404; }
    location /rot { default_type application/json; root $work/www; try_files /2k =404; access_log $work/rot.log rot; } } }
NGINX
taskset -c 1 nginx -p "$work" -c "$work/upstream.conf" & pids+=($!)

# --- The peers, each the best version of itself for this job. *_conf NAME PORT CERT [KEY]: the
# configuration NAME for an instance listening on PORT with that client certificate.
nginx_conf() {
  cat > "$1.conf" <<NGINX
worker_processes 1; error_log $work/$1.err; pid $work/$1.pid; daemon off;
events { worker_connections 4096; }
http { access_log off; $(temps "$1")
  upstream up { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 10000000; }
  server { listen 127.0.0.1:$2; keepalive_requests 10000000;
    location / { proxy_pass https://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_certificate $3; proxy_ssl_certificate_key $4;
      proxy_ssl_trusted_certificate $work/ca.pem; proxy_ssl_verify on; proxy_ssl_name localhost;
      proxy_ssl_server_name on; proxy_ssl_session_reuse on; proxy_ssl_protocols TLSv1.3;
      proxy_buffering on; } } }
NGINX
}
# ssl-load-extra-del-ext: a crt named x.crt with no key in it takes its key from x.key beside it,
# which is how a secret volume holds them (tls.crt, tls.key). A combined PEM needs no lookup.
# idle-close-on-response: a reload's old worker ends each kept-alive client connection with
# "Connection: close" on its next answer instead of closing it while idle, when a client may be
# sending on it (wrk counted those as read errors).
haproxy_conf() {
  cat > "$1.cfg" <<HAP
global
  nbthread 1
  maxconn 4096
  ssl-load-extra-del-ext
defaults
  mode http
  timeout connect 10s
  timeout client 60s
  timeout server 60s
  http-reuse always
  option idle-close-on-response
frontend fe
  bind 127.0.0.1:$2
  default_backend be
backend be
  server up 127.0.0.1:$UP ssl crt $3 ca-file $work/ca.pem verify required sni str(localhost) verifyhost localhost ssl-min-ver TLSv1.3 alpn http/1.1
HAP
}
stunnel_conf() {
  cat > "$1.conf" <<STN
foreground = yes
pid =
[vero]
client = yes
accept = 127.0.0.1:$2
connect = 127.0.0.1:$UP
cert = $3
key = $4
CAfile = $work/ca.pem
verifyChain = yes
checkHost = localhost
sni = localhost
STN
}
ours_args() { # PORT ADMIN-PORT UPSTREAM-PROTOCOL IDENTITY-FLAGS...
  echo --upstream "https://localhost:$UP" "${@:4}" --ca-file "$work/ca.pem" --max-upstream-concurrency 128 --admin-listen "127.0.0.1:$2" --listen "127.0.0.1:$1" --upstream-protocol "$3"; }
start_ours() { VERO_PROXY_LOG=warn exec taskset -c 0 "$bin" $(ours_args "$@"); }

# NAME is a proxy's instance for the cells; NAME-rot its instance for the rotation phase, whose
# client certificate is the secret volume vol-NAME/ (every generation a certificate made above).
names=(nginx haproxy stunnel vero-proxy vero-proxy-h2)
declare -A PORT=([nginx]=$P_NGINX [haproxy]=$P_HAPROXY [stunnel]=$P_STUNNEL [vero-proxy]=$P_OURS [vero-proxy-h2]=$P_OURS2)
for i in "${!names[@]}"; do PORT[${names[$i]}-rot]=$((R + i)); publish "vol-${names[$i]}" 0 rot0.pem rot0.key; done
nginx_conf nginx "$P_NGINX" "$work/client.pem" "$work/client.key"
nginx_conf nginx-rot "${PORT[nginx-rot]}" "$work/vol-nginx/tls.crt" "$work/vol-nginx/tls.key"
haproxy_conf haproxy "$P_HAPROXY" "$work/client-combined.pem"
haproxy_conf haproxy-rot "${PORT[haproxy-rot]}" "$work/vol-haproxy/tls.crt"
stunnel_conf stunnel "$P_STUNNEL" "$work/client.pem" "$work/client.key"
stunnel_conf stunnel-rot "${PORT[stunnel-rot]}" "$work/vol-stunnel/tls.crt" "$work/vol-stunnel/tls.key"
startf() {
  case $1 in
    nginx | nginx-rot) exec taskset -c 0 nginx -p "$work" -c "$work/$1.conf" ;;
    haproxy) exec taskset -c 0 haproxy -f "$work/$1.cfg" ;;
    # Master-worker, reloaded with SIGUSR2 to the master. HAProxy 2.6 hands the listeners to the
    # new worker over the master's socketpair by itself: no "expose-fd listeners" socket, no -x.
    haproxy-rot) exec taskset -c 0 haproxy -W -f "$work/$1.cfg" ;;
    stunnel | stunnel-rot) exec taskset -c 0 stunnel4 "$work/$1.conf" 2>/dev/null ;;
    vero-proxy) start_ours "$P_OURS" $((base + 6)) http1 --cert "$work/client.pem" --key "$work/client.key" ;;
    vero-proxy-h2) start_ours "$P_OURS2" $((base + 7)) auto --cert "$work/client.pem" --key "$work/client.key" ;;
    vero-proxy-rot) start_ours "${PORT[$1]}" $((R + 5)) http1 --identity-dir "$work/vol-vero-proxy" ;;
    vero-proxy-h2-rot) start_ours "${PORT[$1]}" $((R + 6)) auto --identity-dir "$work/vol-vero-proxy-h2" ;;
  esac
}
declare -A PID

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
# Peak RSS of a cell: round 1's (only the smaller cells ran before it in that process) and the
# highest round's (later rounds start with whatever the 1 MiB cells left the allocator holding).
rss_cell() { tr ' ' '\n' | sed '/^$/d' | awk '{ v[NR] = $1; if ($1 > m) m = $1 } END { printf "%.1f / %.1f", v[1] / 1024, m / 1024 }'; }

# --- Identity rotation under load. Per proxy a fresh instance with its client certificate in the
# secret volume vol-NAME/: a steady run, then the same run while every second the volume is swapped
# to the next certificate and the tool's own reload is triggered. The upstream logs each /rot
# request's time and client certificate serial, so each swap's delay to first use can be read off.
reload() { # NAME PID
  case $1 in
    nginx | stunnel) kill -HUP "$2" ;; # both read their configuration and certificates again
    haproxy) kill -USR2 "$2" ;;        # the master re-executes itself and starts a new worker
    *) ;;                              # vero-proxy watches the volume itself
  esac
}
declare -A HOW=([nginx]="SIGHUP" [haproxy]="SIGUSR2 to the -W master" [stunnel]="SIGHUP" [vero-proxy]="its file watch" [vero-proxy-h2]="its file watch")
rot_wrk() { taskset -c 1 wrk -t1 -c64 -d"${ROT_SECS}s" "http://127.0.0.1:${PORT[$1-rot]}/rot"; }
# delays SWAPS LOG: per swap (a "time serial" line), ms from it to the first request the upstream
# logged with that serial at or after it ($ssl_client_serial is upper-case hex; compared without case), or never.
delays() {
  awk 'NR == FNR { at[NR] = $1; s[NR] = toupper($2); n = NR; next }
    { k = toupper($2); for (i = 1; i <= n; i++) if (s[i] == k && $1 >= at[i] && (!(i in best) || $1 < best[i])) best[i] = $1 }
    END { for (i = 1; i <= n; i++) print (i in best) ? sprintf("%.0f", (best[i] - at[i]) * 1000) : "never" }' "$1" "$2"
}
declare -A ROT_STEADY ROT_RATE ROT_RATIO ROT_BAD ROT_SEEN ROT_MS ROT_NEVER
for round in $(seq "$ROT_ROUNDS"); do
  for n in "${names[@]}"; do
    # Every run starts from the first certificate, so no swap brings back the one in service.
    publish "vol-$n" 0 rot0.pem rot0.key
    startf "$n-rot" > "$work/$n-rot.out" 2>&1 & p=$!; pids+=("$p")
    wait_up "${PORT[$n-rot]}"
    # A short load first, so the steady run does not pay for the fresh instance's connections.
    taskset -c 1 wrk -t1 -c64 -d2s "http://127.0.0.1:${PORT[$n-rot]}/rot" > /dev/null
    rot_wrk "$n" > "steady-$n.txt"
    : > rot.log; : > "swaps-$n.txt"
    rot_wrk "$n" > "rotating-$n.txt" & w=$!; pids+=("$w")
    t0=$(now_ns)
    for i in $(seq "$SWAPS"); do
      sleep "$(awk -v d=$((t0 + i * 1000000000 - $(now_ns))) 'BEGIN { print (d > 0 ? d / 1e9 : 0) }')"
      publish "vol-$n" "$i" "rot$i.pem" "rot$i.key"
      echo "$(date +%s.%N) ${SERIAL[$i]}" >> "swaps-$n.txt"
      reload "$n" "$p"
    done
    wait "$w"
    kill "$p"; wait "$p" 2>/dev/null || true
    steady=$(rate "steady-$n.txt") rotating=$(rate "rotating-$n.txt")
    ROT_STEADY[$n]+="$steady " ROT_RATE[$n]+="$rotating "
    ROT_RATIO[$n]+="$(awk -v a="$rotating" -v b="$steady" 'BEGIN { if (b > 0) printf "%.1f", 100 * a / b }') "
    ROT_BAD[$n]=$((${ROT_BAD[$n]:-0} + $(bad "rotating-$n.txt")))
    seen=$(awk '{print toupper($2)}' rot.log | sort -u | wc -l)
    if ((seen < ${ROT_SEEN[$n]:-999})); then ROT_SEEN[$n]=$seen; fi
    delays "swaps-$n.txt" rot.log >> "delays-$n.txt"
  done
done
for n in "${names[@]}"; do
  ROT_NEVER[$n]=$(grep -c never "delays-$n.txt" || true)
  ROT_MS[$n]=never
  if ((ROT_NEVER[$n] < SWAPS * ROT_ROUNDS)); then ROT_MS[$n]=$(grep -v never "delays-$n.txt" | median | awk '{printf "%.0f", $1}'); fi
done

echo
echo "## vero-proxy and its peers, one run ($ROUNDS rounds x ${SECS}s per cell, medians; peak RSS: round 1 / the highest round)"
echo
echo "| proxy | answer x conns | requests/s | p50 us | p99 us | proxy CPU us/request | peak RSS MiB |"
echo "|---|---|---|---|---|---|---|"
for cell in "${cells[@]}"; do
  set -- $cell
  for n in "${names[@]}"; do
    key="$n|$1|$2"
    printf '| %s | %s x %s | %.0f | %.0f | %.0f | %s | %s |\n' "$n" "$1" "$2" "$(echo "${RPS[$key]}" | median)" \
      "$(lat "${P50[$key]}")" "$(lat "${P99[$key]}")" "$(echo "${CPU[$key]}" | median)" "$(echo "${RSS[$key]}" | rss_cell)"
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

echo
echo "## Identity rotation under load, $SWAPS swaps a run, $ROT_ROUNDS runs, 64 connections, 2 KiB (medians; failed: the sum)"
echo
echo "| proxy | reload by | steady requests/s | rotating requests/s | rotating / steady | failed while rotating | client certificates seen upstream | swap to first use, median ms | swaps never used |"
echo "|---|---|---|---|---|---|---|---|---|"
for n in "${names[@]}"; do
  printf '| %s | %s | %.0f | %.0f | %.0f%% | %s | %s | %s | %s |\n' "$n" "${HOW[$n]}" "$(echo "${ROT_STEADY[$n]}" | median)" \
    "$(echo "${ROT_RATE[$n]}" | median)" "$(echo "${ROT_RATIO[$n]}" | median)" \
    "${ROT_BAD[$n]}" "${ROT_SEEN[$n]}" "${ROT_MS[$n]}" "${ROT_NEVER[$n]}"
done
echo
echo "${ROT_SECS}s per run, wrk on CPU 1, a fresh instance of each proxy on CPU 0, its certificate in a Kubernetes-style"
echo "secret volume (..data swapped every second). Certificates seen (the fewest in a run) counts the first one: $((SWAPS + 1)) when every swap was used."
echo "bench/rotation.sh: the same rotation for vero-proxy alone, quicker."
