#!/bin/sh
# Called by report-spam.sieve with the message on stdin. rspamc (Debian: rspamd, or rspamd-client)
# talks to rspamd's controller; its password is the one in rspamd's local.d/worker-controller.inc.
# Without rspamc in this container, the same request with curl:
#   curl -sf -H "Password: $(cat /etc/dovecot/rspamd-controller.password)" --data-binary @- http://rspamd:11334/learnspam
exec rspamc -h rspamd:11334 -P "$(cat /etc/dovecot/rspamd-controller.password)" learn_spam
