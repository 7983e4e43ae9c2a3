# Exactly once for mail from the relay (docs/operations.md, "Exactly once"). Dovecot runs it for
# every delivery, before the user's own script (sieve_before in 90-relay-once.conf).
#
# The relay opens each LMTP delivery with "LHLO <id>.mail-relay", where <id> names one accepted
# message: the same id on every retry of it, another id for any other message, even one with the
# same Message-ID. Dovecot writes that name into the Received header it puts on top. When an
# earlier attempt was saved but its answer never reached the relay (Dovecot stopped, or the
# connection broke, after the final dot), the retry carries the same id and is dropped here. The
# id is kept 5 days, the spool's longest (SPOOL_MAX_AGE_HOURS=120; sieve_duplicate_max_period
# caps it).
require ["duplicate", "variables", "index", "regex"];

if header :index 1 :regex "Received" "^from ([0-9a-z]+)\\.mail-relay[[:space:]]" {
  if duplicate :handle "mail-relay" :seconds 432000 :uniqueid "${1}" {
    discard;
    stop;
  }
}
