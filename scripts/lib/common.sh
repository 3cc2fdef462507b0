# Shared by scripts/test, scripts/demo and bench/: install the Debian packages fanout needs
# (only those missing) and build a tree. Sourced, not run.

FANOUT_PACKAGES=(
  build-essential cmake pkg-config
  libuv1-dev libhiredis-dev libpq-dev libcmocka-dev
  postgresql-15 redis-server redis-tools
  python3 python3-redis python3-psycopg2
  valgrind clang libclang-rt-14-dev clang-format
  # the package: manual pages from --help, lintian on the built .deb, and a minimal Debian 12
  # booted with systemd to install it in (tests/integration/test_package.py)
  help2man lintian debootstrap systemd-container
  # promtool checks the /metrics exposition (tests/integration/test_service.py)
  prometheus
  # the reference consumers in examples/consumers/ (tests/integration/test_consumers.py)
  ruby ruby-redis nodejs
)

fanout_install_deps() {
  local missing=() p
  for p in "${FANOUT_PACKAGES[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  # Debian ships npm apart from nodejs; some nodejs builds bundle it (and conflict with it).
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "fanout: missing Debian packages: ${missing[*]}; run this script as root or install them with apt-get" >&2
    return 1
  fi
  echo "fanout: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d keeps the packages' own system services from starting: fanout's tests and
  # demo start throwaway servers of their own on free ports.
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created=1; fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$created" -eq 1 ] && rm -f "$policy"
  return 0
}

# fanout_build DIR [cmake args...]: configure (once) and build with both cores.
fanout_build() {
  local dir=$1; shift
  cmake -S "$FANOUT_ROOT" -B "$dir" "$@" >/dev/null
  cmake --build "$dir" -j"$(nproc)" -- --no-print-directory >/dev/null
}
