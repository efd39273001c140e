"""``T_OBS`` strings of every format the archive mixes, to UTC."""

from __future__ import annotations

import numpy as np
import pytest

from sdofm.datasets.sdoml import parse_times, tai_to_utc


@pytest.mark.parametrize(
    "text,utc",
    [
        ("2010-08-01T00:00:09.57Z", "2010-08-01T00:00:09.570"),  # AIA, UTC
        ("2010-08-01T00:00:09.57", "2010-08-01T00:00:09.570"),  # no Z (2020 mixes both)
        ("2010-08-01 00:00:09.570", "2010-08-01T00:00:09.570"),  # EVE style
        ("2010.05.01_00:12:04_TAI", "2010-05-01T00:11:30.000"),  # HMI: TAI - 34 s
        ("2012.06.30_23:59:00_TAI", "2012-06-30T23:58:26.000"),  # before the 2012 leap second
        ("2012.07.01_00:00:35_TAI", "2012-07-01T00:00:00.000"),  # after it: TAI - 35 s
        ("2012.07.01_00:00:34_TAI", "2012-07-01T00:00:00.000"),  # the leap second 23:59:60 UTC
        ("2017.01.01_00:01:37_TAI", "2017-01-01T00:01:00.000"),  # TAI - 37 s
        ("2012.06.30_23:59:60_TAI", "2012-06-30T23:59:26.000"),  # seconds written as 60
        ("2016-12-31T23:59:60.50Z", "2017-01-01T00:00:00.500"),  # UTC leap second
    ],
)
def test_parse_times(text, utc):
    times, bad = parse_times([text])
    assert not bad[0]
    assert times[0] == np.datetime64(utc, "ns")


def test_parse_times_marks_bad_entries():
    times, bad = parse_times(
        ["2011-01-01T00:00:00Z", None, "yesterday", "2011-02-30T00:00:00Z", "2011-01-01T25:00:00Z"]
    )
    assert bad.tolist() == [False, True, True, True, True]
    assert np.isnat(times[1:]).all() and not np.isnat(times[0])


def test_tai_to_utc_is_monotonic_outside_leap_seconds():
    t = np.arange(0, 3 * 86400, 3600, dtype=np.int64) * 10**9 + np.datetime64(
        "2015-06-29", "ns"
    ).astype(np.int64)
    assert np.all(np.diff(tai_to_utc(t)) > 0)
