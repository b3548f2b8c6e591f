"""The peers' own test files (scikit-learn, hmmlearn) run against emflow.

The suite runs are deselected by default (marker ``peers``); run them with ``make test-peers``
or ``python -m pytest -m peers tests/test_peers.py``. The checks of the table itself are fast
and run by default. The table of suites, their import
rewrites and exclusions is tests/peers/suites.py; tests/peers/STATUS.md lists what fails.
"""

from __future__ import annotations

import pytest

from tests.peers.runner import SUITE_TIMEOUT, _matches, run_suite
from tests.peers.suites import SUITES


@pytest.mark.peers
@pytest.mark.timeout(SUITE_TIMEOUT + 300)
@pytest.mark.parametrize("suite", SUITES, ids=[s.name for s in SUITES])
def test_peer_suite(suite, tmp_path):
    result = run_suite(suite, tmp_path)
    if result.status == "missing":
        if suite.expected_missing:
            pytest.xfail(f"{suite.name}: {'; '.join(result.problems)} (expected for now)")
        pytest.fail(f"{suite.name}: {'; '.join(result.problems)}")
    assert not result.problems, "\n".join(result.problems) + "\n" + result.log[-3000:]
    assert result.tests, f"{suite.name}: no test ran"
    failures = [f"{t.outcome.upper()} {t.id}: {t.message}" for t in result.failures]
    assert not failures, (f"{len(failures)} of {len(result.tests)} tests of {suite.peer_file} "
                          f"fail against emflow:\n" + "\n".join(failures))


def test_patterns_match_only_their_own_kind():
    # an exclusion is a private-helper test, an xfail an online-LDA one: never both
    for suite in SUITES:
        assert not set(suite.excluded) & set(suite.xfail), suite.name
        for reason in suite.excluded.values():
            assert "private" in reason or "scikit-learn's own" in reason, (suite.name, reason)


def test_pattern_syntax():
    # ``*`` is the only wildcard; brackets are literal; no ``[``: every parametrization
    assert _matches("test_a", "test_a[x-1]") and _matches("test_a", "test_a")
    assert not _matches("test_a", "test_ab[x]")
    assert _matches("*::test_a", "TestK::test_a[log]") and not _matches("*::test_a", "test_a")
    assert _matches("test_a[*online*]", "test_a[csr-online]")
    assert not _matches("test_a[*online*]", "test_a[csr-batch]")
    assert _matches("test_*[estimator1]", "test_b[estimator1]")
    assert not _matches("test_*[estimator1]", "test_b[estimator0]")


def test_every_suite_names_an_installed_peer_file_and_its_import_lines():
    from tests.peers.runner import _site_dir

    for suite in SUITES:
        path = _site_dir(suite.peer_file.split("/")[0]) / suite.peer_file
        lines = path.read_text().splitlines()
        for old, _new in suite.rewrites:
            assert old in lines, (suite.name, old)
