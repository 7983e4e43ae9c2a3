#!/bin/sh
# Called by report-ham.sieve with the message on stdin (see rspamd-learn-spam.sh).
exec rspamc -h rspamd:11334 -P "$(cat /etc/dovecot/rspamd-controller.password)" learn_ham
