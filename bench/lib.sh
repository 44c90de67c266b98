# Shared by the bench scripts (sourced, not run): start a release `parley serve`.
# start_server NAME [serve args...]: logs go to $work/server-NAME.{out,err}; sets
# $server_pid and $addr (host:port) once /readyz answers, or exits with the log.
start_server() {
  local name=$1
  shift
  PARLEY_LOG=warn $PARLEY serve --listen 127.0.0.1:0 "$@" >"$work/server-$name.out" 2>"$work/server-$name.err" &
  server_pid=$!
  addr=
  for _ in $(seq 600); do
    addr=$(sed -n 's#^parley listening on http://##p' "$work/server-$name.out")
    [ -n "$addr" ] && curl -sf "http://$addr/readyz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server did not start"
  cat "$work/server-$name.err"
  exit 1
}

# echo_caller_files DIR: what the echo-agent load scripts share: DIR/clip.wav (a
# caller's turn, about 1.5 s of espeak-ng speech) and DIR/parley.toml (no cap on
# connections per address: every caller comes from this machine's one address).
echo_caller_files() {
  espeak-ng -v en-us -s 150 -w "$1/clip.wav" "Hello, I am calling about my order." 2>/dev/null
  printf '[server.limits]\nconnections_per_ip = 0\n' >"$1/parley.toml"
}
