# Junk for mail the relay's spam filter marked as spam (docs/spam-filter.md). The relay puts its
# own X-Spam: Yes on top of the message only when rspamd's verdict is spam; a sender who writes
# X-Spam: Yes into their own message only sends it to Junk. Run as sieve_after
# (90-relay-junk.conf): after the user's own rules.
require ["fileinto", "mailbox"];

if header :is "X-Spam" "Yes" {
  fileinto :create "Junk";
  stop;
}
