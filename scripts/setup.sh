#!/usr/bin/env bash
# Installs what the test suite needs besides Bun and the npm packages: Dovecot's LMTP server
# and its Sieve plugin (Pigeonhole) from Debian's packages (the integration tests start private
# instances, some with the "exactly once" Sieve script of docs/operations.md), curl (the
# runbook's own test commands are run as written), dnsmasq (a private DNS server for the doctor's
# DNS checks), Prometheus' promtool (the alert rules' checks and unit tests) and Chromium (the
# /status page in a real browser, headless).
set -euo pipefail

need=()
command -v dovecot >/dev/null 2>&1 || [ -x /usr/sbin/dovecot ] || need+=(dovecot-core dovecot-lmtpd)
[ -e /usr/lib/dovecot/modules/lib90_sieve_plugin.so ] && command -v sievec >/dev/null 2>&1 || need+=(dovecot-sieve)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
  echo "setup: dovecot, its Sieve plugin, curl, dnsmasq, promtool and chromium already installed"
  exit 0
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "setup: installing ${need[*]} from Debian's packages"
$sudo apt-get update -qq
# The packages' own start scripts are not needed (tests run private instances), and may be refused.
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "setup: done"
