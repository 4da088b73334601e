"""The rank group's dealing of a batch to ranks and the gathering of per-item results (no Ray started)."""

from actors.workers.rank_group import deal, interleave


def test_deal_is_round_robin_and_interleave_undoes_it():
    items = list(range(7))
    shares = deal(items, 3)
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert interleave(shares) == items
    assert interleave(deal(items, 1)) == items
    assert deal([], 2) == [[], []] and interleave([[], []]) == []
