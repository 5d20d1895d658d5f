"""The sequence/gap tracker with plain numbers: no sockets, no trio, no daemon.

consumers.gaps decides, for each message and heartbeat, "in order", "a gap of N"
or "already reflected"; the stream (test_events_protocol, test_subscriber_holdon)
only acts on those answers.
"""

from __future__ import annotations

from consumers.gaps import Gap, SequenceTracker


def tracker(*names: str) -> SequenceTracker:
    return SequenceTracker(lambda name: not names or name in names)


def test_messages_in_order_are_all_new():
    t = tracker()
    assert t.gap_before("m", 1) is None  # nothing known yet: whatever comes first is in order
    assert t.take("m", 1, 3) == 0
    assert t.last("m") == 3
    assert t.gap_before("m", 4) is None
    assert t.take("m", 4, 1) == 0
    assert t.last("m") == 4


def test_a_jump_is_a_gap_of_exactly_the_missing_messages():
    t = tracker()
    t.take("m", 1, 2)
    assert t.gap_before("m", 6) == Gap("m", 3, 3)  # 3, 4, 5 never came
    assert t.last("m") == 2  # asking moves nothing
    assert t.take("m", 6, 1) == 0
    assert t.last("m") == 6


def test_what_a_snapshot_already_reflects_is_skipped():
    t = tracker()
    t.resynced("m", 10)
    assert t.take("m", 8, 3) is None  # 8..10: all in the snapshot
    assert t.last("m") == 10  # and nothing moved
    assert t.take("m", 9, 4) == 2  # 9, 10 reflected; 11, 12 new
    assert t.last("m") == 12


def test_a_forgotten_topic_carries_on_from_the_next_message():
    t = tracker()
    t.take("m", 1, 1)
    t.forget("m")
    assert t.last("m") is None
    assert t.gap_before("m", 50) is None
    assert t.take("m", 50, 2) == 0


def test_heartbeats_reveal_gaps_and_place_unknown_topics():
    t = tracker()
    assert t.heartbeat({"m": 5}) == []  # first heard of: taken as the start
    assert t.last("m") == 5
    assert t.heartbeat({"m": 5}) == []
    assert t.heartbeat({"m": 9}) == [Gap("m", 6, 4)]
    assert t.last("m") == 5  # the stream decides (resync or forget), not the tracker
    assert t.heartbeat({"m": 3}) == []  # behind what was seen: nothing missed


def test_only_the_selected_topics_are_tracked():
    t = tracker("m")
    assert t.tracks("m") and not t.tracks("other")
    assert t.heartbeat({"m": 1, "other": 50}) == []
    assert t.last("other") is None
    assert t.heartbeat({"m": 1, "other": 99}) == []
    t.baseline({"other": 7, "m": 100})
    assert t.last("other") is None
    assert t.last("m") == 1  # a baseline never moves a known topic


def test_baseline_sets_the_start_without_a_snapshot():
    t = tracker()
    t.baseline({"m": 4})
    assert t.take("m", 3, 2) is None  # sent before the baseline
    assert t.take("m", 5, 1) == 0


def test_a_new_epoch_restarts_every_topic():
    t = tracker()
    assert t.new_epoch("e1") is False  # the first epoch heard is no restart
    t.take("m", 1, 5)
    assert t.new_epoch("e1") is False
    assert t.last("m") == 5
    assert t.new_epoch("e2") is True
    assert t.epoch == "e2"
    assert t.last("m") is None
    assert t.gap_before("m", 1) is None
