"""The twistd plugin: `twistd -n mx [--config PATH]` builds the service in `mx.tap`."""

from twisted.application.service import ServiceMaker

mx = ServiceMaker("mx", "mx.tap", "mx mail server: ESMTP, relay queue, Maildir, POP3, IMAP", "mx")
