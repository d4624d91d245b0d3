# A clamd of the tests' own. Source it (after common.sh), then call
# `start_clamd DIR [ADDRESS]`: it writes a signature database holding only
# the EICAR test string (no signature download is possible or wanted in
# tests), starts clamd on a free port of ADDRESS (default 127.0.0.1; pods on
# the real nodes reach the host on a bridge address), waits until it answers
# PING, and exports
# PEC_E2E_CLAMD (`tcp:127.0.0.1:PORT`, as a MailDomain names it) and
# CLAMD_PID.

start_clamd() {
  local dir=$1 address=${2:-127.0.0.1} port eicar
  mkdir -p "$dir/db"
  # The standard antivirus test string (harmless; every scanner knows it).
  eicar='X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'
  printf '%s:%s:Eicar-Test-Signature\n' "$(printf %s "$eicar" | md5sum | cut -d' ' -f1)" "${#eicar}" >"$dir/db/test.hdb"
  port=$(free_port)
  printf 'Foreground yes\nTCPSocket %s\nTCPAddr %s\nDatabaseDirectory %s\nLogFile %s\nLogTime yes\n' \
    "$port" "$address" "$dir/db" "$dir/clamd.log" >"$dir/clamd.conf"
  clamd -c "$dir/clamd.conf" >/dev/null 2>&1 &
  CLAMD_PID=$!
  export CLAMD_PID PEC_E2E_CLAMD="tcp:$address:$port"
  local _
  for _ in $(seq 1 600); do
    if python3 - "$address" "$port" <<'PY' 2>/dev/null; then return 0; fi
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
s.sendall(b"zPING\0")
sys.exit(0 if s.recv(16).startswith(b"PONG") else 1)
PY
    sleep 0.1
  done
  echo "clamd did not answer PING on port $port; its log:" >&2
  tail -n 20 "$dir/clamd.log" >&2 || true
  return 1
}
