# IMAPSieve (91-relay-learn.conf): a message put into Junk is learnt as spam.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

if environment :matches "imap.user" "*" {
  set "username" "${1}";
}

pipe :copy "rspamd-learn-spam.sh" ["${username}"];
