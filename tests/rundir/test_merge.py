"""rundir/merge.py's summary arithmetic."""

from __future__ import annotations

from hpcinfer.rundir.records import RankRecord


def test_rank_generation_seconds_is_its_window_not_the_sum_of_overlapping_shards():
    from hpcinfer.rundir.merge import rank_generation_seconds

    assert rank_generation_seconds(RankRecord(0, generation_started_at=100.0, generation_ended_at=103.5), 9.0) == 3.5
    assert rank_generation_seconds(RankRecord(0, generation_started_at=100.0), 9.0) == 9.0  # no window recorded
    assert rank_generation_seconds(None, 9.0) == 9.0  # no record: a rank known only by its done markers
