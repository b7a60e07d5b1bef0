# Shared set-up for scripts/test, scripts/demo and scripts/bench (sourced, not run).
# Creates .venv on first use and reinstalls only when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

tm_log() { printf '[trustmesh] %s\n' "$*" >&2; }

tm_ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    tm_log "creating virtual environment in .venv"
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.trustmesh-installed"
  local want
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    tm_log "installing trustmesh and its dependencies into .venv (first run takes a minute)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    local log="$VENV/install.log"
    if ! "$VENV/bin/python" -m pip install -e "$ROOT[dev]" >"$log" 2>&1; then
      tail -n 30 "$log" >&2
      tm_log "installing the dependencies failed; the full log is $log"
      return 1
    fi
    echo "$want" >"$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
}

tm_ensure_etcd() {
  if command -v etcd >/dev/null 2>&1; then
    return 0
  fi
  tm_log "etcd not found on PATH; installing Debian package etcd-server"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
  # The package may start a system etcd on :2379; tests use their own ports, so stop it.
  $sudo systemctl disable --now etcd >/dev/null 2>&1 || true
  command -v etcd >/dev/null 2>&1 || { tm_log "etcd-server installed but etcd is not on PATH"; return 1; }
}

tm_ensure_nginx() {
  # nginx with its stream module is the reference the proxy benchmark measures against.
  if command -v nginx >/dev/null 2>&1 && [ -f /usr/lib/nginx/modules/ngx_stream_module.so ]; then
    return 0
  fi
  tm_log "installing nginx and its stream module (the reference for the proxy benchmark)"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx libnginx-mod-stream >/dev/null
  # The package may start a system nginx on :80; the benchmark runs its own, so stop it.
  $sudo systemctl disable --now nginx >/dev/null 2>&1 || true
}

tm_ensure_graphviz() {
  # `trustmesh graph --format dot` is checked by rendering it with Graphviz's own dot.
  if command -v dot >/dev/null 2>&1; then
    return 0
  fi
  tm_log "installing graphviz (the tests render \`trustmesh graph --format dot\` with it)"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends graphviz >/dev/null
}

tm_ensure_chromium() {
  # The web console's browser tests (tests/integration/test_console_browser.py) drive Debian's
  # Chromium headless through its ChromeDriver, with Selenium.
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    return 0
  fi
  tm_log "installing chromium and chromium-driver (the web console's browser tests drive them)"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
}

tm_ensure_softhsm() {
  # CA keys in an HSM are tested against a real SoftHSM2 token (and its tools from OpenSC);
  # the tests initialise their own tokens in temporary directories.
  if command -v softhsm2-util >/dev/null 2>&1 && [ -e /usr/lib/softhsm/libsofthsm2.so ]; then
    return 0
  fi
  tm_log "installing softhsm2 and opensc (the HSM tests use a real SoftHSM2 token)"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends softhsm2 opensc >/dev/null
}

tm_ensure_systemd_analyze() {
  # The systemd units in deploy/systemd are checked by systemd's own parser
  # (`systemd-analyze verify` and `security --offline`); the machine image ships it, this
  # only covers one that does not. Installing the package starts nothing in a container.
  if command -v systemd-analyze >/dev/null 2>&1; then
    return 0
  fi
  tm_log "installing systemd (the deploy tests verify the unit files with systemd-analyze)"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
}
