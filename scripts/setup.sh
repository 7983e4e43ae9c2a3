#!/usr/bin/env bash
# Installs what the test suite needs besides Bun and the npm packages: Dovecot's LMTP server
# and its Sieve plugin (Pigeonhole) from Debian's packages (the integration tests start private
# instances, some with the "exactly once" and Junk Sieve scripts of examples/dovecot/), Postfix (private
# instances as the operator's MTA in front of Dovecot, DELIVER_TO=smtp://), rspamd and dnsmasq (the
# spam filter's tests start a private rspamd with its own DNS; the doctor's DNS checks ask a private
# dnsmasq), Prometheus' promtool (the alert rules' checks and unit tests), Chromium (the /status
# page in a real browser, headless) and curl (the runbook's own test commands are run as written).
set -euo pipefail

need=()
command -v dovecot >/dev/null 2>&1 || [ -x /usr/sbin/dovecot ] || need+=(dovecot-core dovecot-lmtpd)
[ -e /usr/lib/dovecot/modules/lib90_sieve_plugin.so ] && command -v sievec >/dev/null 2>&1 || need+=(dovecot-sieve)
command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ] || need+=(postfix)
command -v rspamd >/dev/null 2>&1 || [ -x /usr/bin/rspamd ] || need+=(rspamd)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
  echo "setup: dovecot, its Sieve plugin, postfix, rspamd, dnsmasq, promtool, chromium and curl already installed"
  exit 0
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "setup: installing ${need[*]} from Debian's packages"
$sudo apt-get update -qq
# The packages' own start scripts are not needed (tests run private instances), and may be refused.
# Postfix asks what kind of mail system this is: "Internet Site" (the default) is answered here.
echo "postfix postfix/main_mailer_type select Internet Site" | $sudo debconf-set-selections 2>/dev/null || true
echo "postfix postfix/mailname string localhost" | $sudo debconf-set-selections 2>/dev/null || true
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "setup: done"
