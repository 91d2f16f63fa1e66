"""A short soak in the suite: tests/tools/soak.py's mixed load for 10 s on a real server process.

`make soak` runs the same load for 60 s and prints the report.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from tools.soak import ALLOWED, MIB, MIX, server_process, soak

SECONDS = float(os.environ.get("HINGELOSS_SOAK_SECONDS", "10"))
# Growth of the server's RSS once warm (after the first fifth of the run).
RSS_GROWTH_BOUND = 32 * MIB


@pytest.mark.slow
def test_short_soak_has_no_unexpected_answer_and_bounded_rss() -> None:
    # Leaving the block sends SIGTERM and requires a clean exit: shutdown is part of it.
    with server_process() as (target, pid):
        report = asyncio.run(soak(target, SECONDS, pid=pid, sample_every=0.5))

    assert report.unexpected == []
    assert set(report.codes) == set(MIX)  # every kind of call ran
    for kind, codes in report.codes.items():
        assert set(codes) <= ALLOWED[kind], (kind, codes)
    assert report.codes["valid"]["OK"] > 100
    assert report.checked > 100
    assert report.codes["invalid"]["INVALID_ARGUMENT"] > 10
    assert report.codes["garbage"]["INVALID_ARGUMENT"] > 0
    assert report.codes["cancel"]["CANCELLED"] > 0
    assert report.codes["tiny_deadline"]["DEADLINE_EXCEEDED"] > 0
    assert report.codes["stream"]["OK"] > 0
    assert len(report.rss) >= 10
    assert report.rss_growth_bytes < RSS_GROWTH_BOUND, report.to_json()["rss_mib"]
