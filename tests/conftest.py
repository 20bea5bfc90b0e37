"""pytest configuration shared by every test: the import path.

The tests import the project's modules (hoster_ha, ha_watchdog), the fakes under tools/
(localcluster, fake_host_cmd) and the helpers next to them (sim, invariants, netns,
test_core), whatever the directory pytest is started from.
"""
import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for _p in (os.path.join(ROOT, "tools"), TESTS, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)


@pytest.hookimpl(tryfirst=True)      # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n 3 --dist loadgroup`), tests that share
    something run on one worker, in order: the network tests (one runner drives every
    scenario of the module), each class (a class-scoped cluster; test_zz_stop ends it)
    and test_http.py (a module-scoped cluster).  Every other test goes where a worker
    is free."""
    if not hasattr(config, "workerinput"):      # not an xdist worker
        return
    for item in items:
        module = os.path.basename(str(item.fspath))
        if module in ("test_netns.py", "test_http.py"):
            group = module
        elif item.cls is not None:
            group = f"{module}::{item.cls.__name__}"
        else:
            continue
        item.add_marker(pytest.mark.xdist_group(group))
