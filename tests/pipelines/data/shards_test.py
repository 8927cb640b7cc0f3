"""`interleaved_lines`: one pass over shards, every line once, books mixed, seeded."""

import collections
import gzip

import pytest

from keras_moe.pipelines.data.shards import interleaved_lines, mixing_report


def write_shards(folder, shards=4, books=5, lines=200, gz=True):
    """Shards of whole books; line `s{shard}b{book}l{i}` names where it came from."""
    paths = []
    for s in range(shards):
        text = "".join(f"s{s}b{b}l{i}\n" + ("\n" if i % 50 == 0 else "")  # blank lines too
                       for b in range(books) for i in range(lines))
        path = folder / (f"train-{s:05d}.txt" + (".gz" if gz else ""))
        if gz:
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            path.write_text(text, encoding="utf-8")
        paths.append(str(path))
    return paths


def book(line):
    return line.split("l")[0]


def test_every_line_exactly_once_and_blank_lines_left_out(tmp_path):
    paths = write_shards(tmp_path)
    out = list(interleaved_lines(paths, seed=3, block_lines=16, buffer_lines=500))
    expected = [f"s{s}b{b}l{i}" for s in range(4) for b in range(5) for i in range(200)]
    assert len(out) == len(expected) == 4000
    assert collections.Counter(out) == collections.Counter(expected)


def test_same_seed_same_order_other_seed_other_order(tmp_path):
    paths = write_shards(tmp_path, gz=False)
    a = list(interleaved_lines(paths, seed=1, block_lines=8, buffer_lines=100))
    b = list(interleaved_lines(paths, seed=1, block_lines=8, buffer_lines=100))
    c = list(interleaved_lines(paths, seed=2, block_lines=8, buffer_lines=100))
    assert a == b and a != c


def test_books_are_mixed_where_reading_in_order_is_not(tmp_path):
    paths = write_shards(tmp_path)
    in_order = [line for p in paths for line in interleaved_lines(
        [p], seed=0, block_lines=10_000, buffer_lines=1)]
    mixed = list(interleaved_lines(paths, seed=0, block_lines=16, buffer_lines=1000))
    # Reading shard after shard: each window of 100 lines holds 1 book (2 at a seam).
    assert mixing_report(((book(x), x) for x in in_order), window=100) < 1.1
    # Interleaved and shuffled: most of the 20 books in every window of 100.
    assert mixing_report(((book(x), x) for x in mixed), window=100) > 12
    # Without the buffer, the block order alone still brings in every shard early:
    # all 4 shards appear within the first 4 * 16 * 4 lines.
    first = list(interleaved_lines(paths, seed=0, block_lines=16, buffer_lines=1))[:256]
    assert {x.split("b")[0] for x in first} == {"s0", "s1", "s2", "s3"}


def test_block_order_by_hand(tmp_path):
    # Two shards of 4 lines, blocks of 2, no buffer: the lines of a block stay together
    # and in order, and each shard's blocks keep their order.
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a1\na2\na3\na4\n", encoding="utf-8")
    b.write_text("b1\nb2\nb3\nb4\n", encoding="utf-8")
    out = list(interleaved_lines([str(a), str(b)], seed=5, block_lines=2, buffer_lines=1))
    blocks = [tuple(out[i:i + 2]) for i in range(0, 8, 2)]
    assert sorted(blocks) == [("a1", "a2"), ("a3", "a4"), ("b1", "b2"), ("b3", "b4")]
    assert blocks.index(("a1", "a2")) < blocks.index(("a3", "a4"))
    assert blocks.index(("b1", "b2")) < blocks.index(("b3", "b4"))


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="paths"):
        list(interleaved_lines([]))
    with pytest.raises(ValueError, match="block_lines"):
        list(interleaved_lines(["x"], block_lines=0))
    with pytest.raises(ValueError, match="buffer_lines"):
        list(interleaved_lines(["x"], buffer_lines=True))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: not valid UTF-8"):
        list(interleaved_lines([str(bad)], buffer_lines=1))
    with pytest.raises(FileNotFoundError):
        list(interleaved_lines([str(tmp_path / "missing.txt.gz")]))


def test_lm_training_lines_interleave_shards_when_configured(tmp_path):
    from keras_moe.pipelines.config import load_config
    from keras_moe.pipelines.lm import train as lm_train
    from keras_moe.pipelines.lm.config import LMConfig

    paths = write_shards(tmp_path)
    glob = str(tmp_path / "train-*.txt.gz")
    config = load_config(LMConfig, None, [
        f"data.train={glob}", f"data.valid={paths[0]}", "data.interleave_block_lines=16",
        "data.interleave_buffer_lines=500"])
    factory = lm_train.lines_factory(config.data, "train", seed=7)
    first, second = list(factory()), list(factory())
    # Each pass is the interleaving of the shards with the seed and the pass number.
    assert first == list(interleaved_lines(paths, seed=[7, 0], block_lines=16, buffer_lines=500))
    assert second == list(interleaved_lines(paths, seed=[7, 1], block_lines=16, buffer_lines=500))
    assert first != second and sorted(first) == sorted(second)
    # Without the key, the files are read one after another, as before.
    plain = load_config(LMConfig, None, [f"data.train={glob}", f"data.valid={paths[0]}"])
    in_order = list(lm_train.lines_factory(plain.data, "train")())
    assert in_order[:3] == ["s0b0l0", "s0b0l1", "s0b0l2"]
    # Validation is never interleaved.
    assert list(lm_train.lines_factory(config.data, "valid")())[:3] == ["s0b0l0", "s0b0l1", "s0b0l2"]


def test_interleaving_needs_text_shards():
    from keras_moe.pipelines.lm.config import DataConfig

    with pytest.raises(ValueError, match="interleave_block_lines"):
        DataConfig(format="ptb", interleave_block_lines=8)
    with pytest.raises(ValueError, match="interleave_buffer_lines"):
        DataConfig(interleave_block_lines=8, interleave_buffer_lines=0)
