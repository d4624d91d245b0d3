# A SoftHSM2 token for the tests and benchmarks. Source it, then call
# `init_hsm DIR`: it writes a SoftHSM configuration under DIR, initialises a
# token and exports SOFTHSM2_CONF, PEC_PKCS11_MODULE, PEC_E2E_HSM_TOKEN,
# PEC_E2E_HSM_TOKEN_WRONG_PIN and PEC_E2E_HSM_TOKEN_PROBE (tokens for tests
# that log in with a wrong PIN) and
# PEC_E2E_HSM_PIN (random per run; never printed). The token label is
# PEC_E2E_HSM_TOKEN if set, else pec-e2e.

init_hsm() {
  local dir=$1
  mkdir -p "$dir/tokens"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$dir/tokens" >"$dir/softhsm2.conf"
  export SOFTHSM2_CONF="$dir/softhsm2.conf"
  export PEC_PKCS11_MODULE=${PEC_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
  export PEC_E2E_HSM_TOKEN=${PEC_E2E_HSM_TOKEN:-pec-e2e}
  PEC_E2E_HSM_PIN=$(python3 -c 'import secrets; print(secrets.token_hex(8))')
  export PEC_E2E_HSM_PIN
  local so_pin
  so_pin=$(python3 -c 'import secrets; print(secrets.token_hex(8))')
  softhsm2-util --init-token --free --label "$PEC_E2E_HSM_TOKEN" --pin "$PEC_E2E_HSM_PIN" --so-pin "$so_pin" >/dev/null
  # A second token, same PIN, for tests that log in with a wrong one: a failed
  # login rewrites the token's files, and another process reading the same
  # token at that moment can find them half-written.
  export PEC_E2E_HSM_TOKEN_WRONG_PIN="$PEC_E2E_HSM_TOKEN-wrong-pin"
  softhsm2-util --init-token --free --label "$PEC_E2E_HSM_TOKEN_WRONG_PIN" --pin "$PEC_E2E_HSM_PIN" --so-pin "$so_pin" >/dev/null
  # A third, for the availability probe test, whose gateway logs in with a
  # wrong PIN while the operator uses its key.
  export PEC_E2E_HSM_TOKEN_PROBE="$PEC_E2E_HSM_TOKEN-probe"
  softhsm2-util --init-token --free --label "$PEC_E2E_HSM_TOKEN_PROBE" --pin "$PEC_E2E_HSM_PIN" --so-pin "$so_pin" >/dev/null
}
