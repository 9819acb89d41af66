from exporters.corpus import read_texts, split_corpus


def test_split_is_deterministic_disjoint_and_by_file() -> None:
    split = split_corpus()
    assert len(split.train) > 100
    assert len(split.held_out) > 5
    assert not set(split.train) & set(split.held_out)
    # A second walk (cache bypassed) gives the same split, independent of listing order.
    again = split_corpus.__wrapped__(split.root)
    assert again == split
    assert all(p.suffix == ".py" for p in split.train + split.held_out)


def test_read_texts_respects_the_byte_budget() -> None:
    split = split_corpus()
    texts = list(read_texts(split.root, split.train, 50_000))
    assert texts
    assert sum(len(t) for t in texts) <= 50_000 or len(texts) == 1
