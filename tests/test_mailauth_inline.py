"""The cache-only path of mail authentication: the same verdict with no I/O, or WouldBlock.

`MailAuth.check` judges a message on the reactor thread when every lookup it needs is
cached (`Lookup.cache_only()`); a miss must escape every check's own error handling as
`WouldBlock` (so the message is judged again in the pool), never turn into a result.
"""

from __future__ import annotations

from twisted.internet.threads import deferToThread
from twisted.names import dns as tdns
from twisted.trial.unittest import TestCase

from mx.config import MailAuthConfig
from mx.mailauth.check import check_message
from mx.mailauth.lookup import Lookup, WouldBlock
from tests.test_mailauth_lookup import serve

MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: hi\r\n"
           b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@sender.test>\r\n\r\nhello\r\n")


class CacheOnlyTests(TestCase):
    async def test_cold_cache_would_block_warm_cache_gives_the_same_verdict(self) -> None:
        port, factory = serve(self, {"sender.test": [
            ("sender.test", tdns.Record_TXT(b"v=spf1 ip4:127.0.0.1 -all", ttl=3600)),
            ("_dmarc.sender.test", tdns.Record_TXT(b"v=DMARC1; p=reject", ttl=3600)),
        ]})
        lookup = Lookup([("127.0.0.1", port)], 2.0)
        cfg = MailAuthConfig()

        def judge(source: object) -> object:
            return check_message(MESSAGE, ip="127.0.0.1", helo="sender.test", mail_from="alice@sender.test",
                                 cfg=cfg, authserv_id="mx.example.test", lookup=source)  # type: ignore[arg-type]

        with self.assertRaises(WouldBlock):
            judge(lookup.cache_only())  # nothing cached: no check may swallow the miss
        warm = await deferToThread(judge, lookup)
        inline = judge(lookup.cache_only())  # on the reactor thread: it must not do I/O
        self.assertEqual(inline.header, warm.header)
        self.assertEqual(inline.action, warm.action)
        self.assertIn(b"spf=pass", inline.header)
        self.assertIn(b"dmarc=pass", inline.header)
