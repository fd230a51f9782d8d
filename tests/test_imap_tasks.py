"""mx.imap.tasks: the read-pool work of IMAP commands, on a real Maildir in a temp folder."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from mx.imap import fetch, tasks
from mx.imap.parse import CommandReader, SequenceSet
from mx.imap.selected import View
from mx.store import Folder


def _plan(items: str, uid: bool = False) -> fetch.FetchPlan:
    r = CommandReader()
    r.receive_data(f"a FETCH 1:* {items}\r\n".encode())
    plan = fetch.parse_items(r.next_event().args[1:])
    return fetch.with_uid(plan) if uid else plan


class _Folder(TestCase):
    """Six messages with several flag sets, a keyword, and one taken from new/ (\\Recent)."""

    def setUp(self) -> None:
        root = Path(self.mktemp())
        for sub in ("new", "cur", "tmp"):
            (root / sub).mkdir(parents=True)
        flags = ["", "S", "FS", "a", "RST", "S"]
        for i, letters in enumerate(flags):
            body = f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()
            sub = "new" if i == 5 else "cur"
            name = f"{1700000000 + i}.M{i}P1.host,S={len(body)}" + ("" if sub == "new" else f":2,{letters}")
            (root / sub / name).write_bytes(body)
        (root / "dovecot-keywords").write_text("0 $Work\n")
        self.folder = Folder.open(root, take_new=True)
        recent = self.folder.take_recent()
        self.view = View.open(self.folder.messages(), recent, self.folder.keywords.mapping(),
                              self.folder.uidvalidity, self.folder.next_uid, False)


class NamesOnlyFetchTests(_Folder):
    def test_the_fast_path_answers_what_render_answers(self) -> None:
        pairs = self.view.select(SequenceSet("1:*"), False)
        for items, uid in (("FLAGS", False), ("(FLAGS UID)", False), ("(RFC822.SIZE FLAGS)", True), ("UID", False),
                           ("(FLAGS RFC822.SIZE UID)", False), ("(RFC822.SIZE UID FLAGS)", False),
                           ("RFC822.SIZE", False)):
            plan = _plan(items, uid)
            fast, updated, missing = tasks.fetch_batch(self.folder, self.view, pairs, plan, False, None)
            slow = b"".join(
                fetch.render(seq, plan, uid=u, flags=self.view.flags_of(u), size=self.view.info[u].size,
                             internaldate=None, data=None, root=None)
                for seq, u in pairs)
            self.assertEqual(fast, slow, items)
            self.assertEqual((updated, missing), ([], False))
        flags = tasks.fetch_batch(self.folder, self.view, pairs, _plan("FLAGS"), False, None)[0]
        self.assertIn(b"\\Recent", flags)  # the message taken from new/
        self.assertIn(b"$Work", flags)  # keyword letter "a"


class FlagSearchTests(_Folder):
    """The flag-only SEARCH path (one answer per distinct flag set) agrees with the general one."""

    def test_flag_only_queries_answer_as_the_general_path(self) -> None:
        from mx.imap import search

        def query(text: str) -> search.Query:
            r = CommandReader()
            r.receive_data(f"a SEARCH {text}\r\n".encode())
            return search.parse_search(r.next_event().args)

        cases = ["UNSEEN", "SEEN", "NOT SEEN", "OR FLAGGED DELETED", "KEYWORD $Work", "UNKEYWORD $Work",
                 "NEW", "OLD", "RECENT", "ALL", "ANSWERED UNDELETED", "(SEEN) NOT (FLAGGED)"]
        original = tasks._flags_decide
        for text in cases:
            q = query(text)
            self.assertTrue(tasks._flags_decide(q.key), text)
            fast = tasks.run_search(self.folder, self.view, q)
            self.patch(tasks, "_flags_decide", lambda key: False)
            slow = tasks.run_search(self.folder, self.view, q)
            self.patch(tasks, "_flags_decide", original)
            self.assertEqual(fast, slow, text)
        for text in ("UID 1:3 UNSEEN", "1:2 SEEN", "LARGER 10", "SUBJECT x"):
            self.assertFalse(tasks._flags_decide(query(text).key), text)
        self.assertEqual([u for _s, u in tasks.run_search(self.folder, self.view, query("UNSEEN"))],
                         [i.uid for i in self.folder.messages() if "S" not in i.flags])


class LettersTests(_Folder):
    """View.letters walks `info` in its own order only while that order is `uids`' order."""

    def expected(self) -> list[frozenset[str]]:
        return [self.view.info[u].flags for u in self.view.uids]

    def test_in_order(self) -> None:
        self.assertEqual(self.view.letters(), self.expected())
        self.assertEqual(self.view.unseen_count(), sum("S" not in f for f in self.expected()))

    def test_dict_out_of_order(self) -> None:
        infos = list(self.folder.messages())
        view = View.open({i.uid: i for i in reversed(infos)}, [], {}, 1, 99, False)
        self.assertEqual(view.letters(), [view.info[u].flags for u in view.uids])

    def test_insertion_below_the_top(self) -> None:
        from mx.store.folder import Changes
        infos = sorted(self.folder.messages(), key=lambda i: i.uid)
        view = View.open({i.uid: i for i in infos[1:]}, [], {}, 1, 99, False)
        self.assertEqual(view.letters(), [view.info[u].flags for u in view.uids])  # checked: in order
        view.apply(Changes(new=(infos[0],), vanished=(), flags=()), [], {}, 99, True)
        self.assertEqual(view.uids[0], infos[0].uid)
        self.assertEqual(view.letters(), [view.info[u].flags for u in view.uids])


class FetchChunkTests(_Folder):
    """A FETCH's trips: index ranges, cut by count and octets, the pairs made per trip."""

    def test_trips_cover_the_set_in_order_within_their_limits(self) -> None:
        from mx.imap.selected import pairs_in
        from mx.imap.session import _fetch_chunks

        view, uids = self.view, self.view.uids
        sizes = {u: view.info[u].size for u in uids}
        for text, by_uid in (("1:*", False), ("1,3,5:6", False), ("6,2,1", True), ("2:4,4:5", False), ("9:*", True)):
            spans = view.spans(SequenceSet(text), by_uid)
            wanted = view.select(SequenceSet(text), by_uid)
            self.assertEqual(pairs_in(uids, spans), wanted)
            if spans:  # a slice of the list (what FETCH keeps), its messages' numbers the same
                first = spans[0][0]
                shifted = [(i - first, j - first) for i, j in spans]
                self.assertEqual(pairs_in(uids[first : spans[-1][1]], shifted, first), wanted)
            for count, octets in ((1, 0), (2, 0), (500, 0), (500, 1), (3, 2 * max(sizes.values())), (2, 10**9)):
                trips = [pairs_in(uids, t) for t in _fetch_chunks(spans, uids, view, count, octets)]
                self.assertEqual([p for t in trips for p in t], wanted, (text, count, octets))
                for t in trips:
                    self.assertTrue(1 <= len(t) <= count)
                    if octets and len(t) > 1:
                        self.assertLessEqual(sum(sizes[u] for _s, u in t), octets)
