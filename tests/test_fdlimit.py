"""mx.fdlimit: the soft open-file limit is raised to the hard one at start-up."""

from __future__ import annotations

import subprocess
import sys

from twisted.trial import unittest

CHILD = """
import resource
from mx.fdlimit import raise_nofile_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
low = min(256, hard)
resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
old, new, got_hard = raise_nofile_limit(10_000)
print(old, new, got_hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard, low)
"""


class RaiseTests(unittest.TestCase):
    def test_soft_limit_goes_up_to_the_hard_limit(self) -> None:
        # In a child: the test runner's own limit stays as it was.
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True)
        old, new, got_hard, now, hard, low = map(int, out.stdout.split())
        self.assertEqual(old, low)
        self.assertEqual(got_hard, hard)
        self.assertEqual(now, new)
        if hard != -1:  # RLIM_INFINITY
            self.assertEqual(new, hard)

    def test_no_limit_is_never_below(self) -> None:
        import resource

        from mx.fdlimit import below

        self.assertFalse(below(resource.RLIM_INFINITY, 10_000))
        self.assertTrue(below(1024, 1064))
        self.assertFalse(below(20000, 1064))
