#!/usr/bin/env bash
# Install what the test suite needs (Debian tools, the package with its test extras), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in psql:postgresql-client pgbench:postgresql-contrib pgbouncer:pgbouncer sysbench:sysbench mariadb:mariadb-client; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || missing+=("${tool##*:}")
done
[ -f /usr/share/java/postgresql.jar ] || missing+=(libpostgresql-jdbc-java)  # PgJDBC, for the driver tests
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
  $apt_get update -qq
  DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test,bench]' 2>&1 | grep -v -i "warning" || true
# A temporary folder of this run's own (pytest's shared /tmp/pytest-of-$USER is made private again by every
# pytest that starts, which would lock the database servers of a run going on beside it out of their folders).
base=$(mktemp -d "${TMPDIR:-/tmp}/dbproxy-tests.XXXXXX")
chmod 711 "$base"
status=0
python3 -m pytest --basetemp="$base/run" "$@" || status=$?
if [ "$status" -eq 0 ]; then rm -rf "$base"; else echo "test files kept in $base/run"; fi
exit "$status"
