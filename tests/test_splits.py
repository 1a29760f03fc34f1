import hashlib

from tasks.splits import split_of


def ids(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def test_split_is_deterministic_and_matches_fractions():
    pool = ids(20_000)
    splits = [split_of(i, 0.8, 0.1) for i in pool]
    assert splits == [split_of(i, 0.8, 0.1) for i in pool]
    for name, frac in [("train", 0.8), ("val", 0.1), ("test", 0.1)]:
        assert abs(splits.count(name) / len(pool) - frac) < 0.01


def test_split_is_stable_as_data_grows():
    before = {i: split_of(i, 0.7, 0.15) for i in ids(1000)}
    grown = ids(1000) + ids(5000, salt="new")  # new images arrive, in any order
    after = {i: split_of(i, 0.7, 0.15) for i in reversed(grown)}
    assert all(after[i] == s for i, s in before.items())


def test_edge_fractions():
    pool = ids(500)
    assert {split_of(i, 1.0, 0.0) for i in pool} == {"train"}
    assert {split_of(i, 0.0, 0.0) for i in pool} == {"test"}
