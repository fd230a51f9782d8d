"""Mail authentication: policy decisions from `mime` and DNS answers, no protocol code and no
Twisted (checks run in a thread pool; their DNS lookups block that thread, never the reactor).

Modules:
- `lookup`: blocking DNS through the configured nameservers, TTL-cached, under a deadline;
- `spf`: RFC 7208 check_host();
- `dkim`: RFC 6376 / RFC 8463 verification of every signature, and signing;
- `arc`: RFC 8617 chain validation and sealing;
- `dmarc`: RFC 7489 alignment and policy;
- `results`: the RFC 8601 Authentication-Results header;
- `check`: one message's verdict from all of the above.
"""
