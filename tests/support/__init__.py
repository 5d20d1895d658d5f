"""Helpers shared by the tests: real maps (kernel), daemons and followers (events),
bcc sources (sources).  Not tests themselves, so no ``test_`` prefix."""
