# Shared by the bench scripts (sourced, not run): tools, a release build, a work directory that
# is removed with every process started in it, and a throwaway PKI.

# need TOOL... -- PACKAGE...: installs the packages with apt-get when a tool is missing.
need() {
  local tools=() pkgs=() seen=0 t
  for t in "$@"; do
    if [[ $t == -- ]]; then seen=1; elif ((seen)); then pkgs+=("$t"); else tools+=("$t"); fi
  done
  for t in "${tools[@]}"; do
    if ! command -v "$t" >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
      return
    fi
  done
}

# Builds the release binary into $bin, makes $work (readable by nginx workers, which run as
# www-data), cds there, and on exit kills every pid in $pids and removes $work.
bench_start() {
  cargo build --release --quiet
  bin=$PWD/target/release/vero-proxy
  work=$(mktemp -d)
  chmod 755 "$work"
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"' EXIT
  cd "$work"
}

# make_ca KEYOPTS...: ca.pem + ca.key, e.g. `make_ca rsa:2048` or `make_ca ec -pkeyopt ec_paramgen_curve:P-256`.
make_ca() {
  KEY=("$@")
  openssl req -x509 -newkey "${KEY[@]}" -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=bench CA" \
    -addext basicConstraints=critical,CA:TRUE 2>/dev/null
}

# issue NAME SUBJECT EXTENSION: NAME.pem + NAME.key from the CA, with the CA's key type.
issue() {
  openssl req -newkey "${KEY[@]}" -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile "$1.ext" -out "$1.pem" 2>/dev/null
}

# publish VOL N CERT KEY: generation N of a Kubernetes-style secret volume in VOL, swapped in as the
# kubelet does it: CERT and KEY copied to VOL/..genN/tls.crt and tls.key, then the ..data symlink
# replaced in one rename. The first call also makes VOL's tls.crt and tls.key links to ..data.
publish() {
  local vol=$1 gen="..gen$2"
  mkdir -p "$vol/$gen"; cp "$3" "$vol/$gen/tls.crt"; cp "$4" "$vol/$gen/tls.key"
  ln -sfn "$gen" "$vol/..data_tmp" && mv -T "$vol/..data_tmp" "$vol/..data"
  if [[ ! -L $vol/tls.crt ]]; then ln -s ..data/tls.crt "$vol/tls.crt"; ln -s ..data/tls.key "$vol/tls.key"; fi
}

# rate WRK-OUTPUT: requests/s. bad WRK-OUTPUT: failed requests (non-2xx answers and socket errors).
rate() { awk '/Requests\/sec/ {print $2}' "$1"; }
bad() { awk '/Non-2xx/ {n+=$5} /Socket errors/ {gsub(/,/,""); n+=$4+$6+$8+$10} END {print n+0}' "$1"; }

# serial_upstream PORT LISTEN-OPTIONS: an nginx upstream on CPU 1 at 127.0.0.1:PORT that requires
# a client certificate from ca.pem, answers body.json (2 KiB) to every path, and logs each
# request's client certificate serial to access.log. LISTEN-OPTIONS: "ssl" or "ssl http2".
serial_upstream() {
  head -c 2048 /dev/zero | tr '\0' 'x' > body.json
  cat > nginx.conf <<NGINX
daemon off; master_process off; worker_processes 1; error_log $work/error.log; pid $work/nginx.pid;
events { worker_connections 4096; }
http {
  log_format serial '\$ssl_client_serial';
  access_log $work/access.log serial;
  keepalive_requests 1000000;
  client_body_temp_path $work/t1; proxy_temp_path $work/t2; fastcgi_temp_path $work/t3; uwsgi_temp_path $work/t4; scgi_temp_path $work/t5;
  server {
    listen 127.0.0.1:$1 $2;
    ssl_certificate $work/server.pem; ssl_certificate_key $work/server.key;
    ssl_client_certificate $work/ca.pem; ssl_verify_client on; ssl_verify_depth 2;
    location / { default_type application/json; root $work; try_files /body.json =404; }
  }
}
NGINX
  taskset -c 1 nginx -p "$work" -c "$work/nginx.conf" & pids+=($!)
}
