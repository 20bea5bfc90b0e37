"""pytest configuration shared by every test: the import path.

The tests import the project's modules (hoster_ha, ha_watchdog), the fakes under tools/
(localcluster, fake_host_cmd) and the helpers next to them (sim, invariants, netns,
test_core), whatever the directory pytest is started from.
"""
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for _p in (os.path.join(ROOT, "tools"), TESTS, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)
