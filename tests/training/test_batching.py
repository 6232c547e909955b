import random

from training.batching import collate, length_grouped_batches, micro_batches, shard
from training.data import Example


def test_batches_cover_every_row_once_and_group_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(64, 512) for _ in range(1000)]
    batches = length_grouped_batches(lengths, 8, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest first: OOM shows at once

    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    naive = [list(range(i, i + 8)) for i in range(0, 1000, 8)]
    assert padded(batches) < 1.05 * sum(lengths) < padded(naive)


def test_order_is_a_function_of_seed_and_epoch():
    lengths = list(range(10, 60))
    assert length_grouped_batches(lengths, 4, 3) == length_grouped_batches(lengths, 4, 3)
    assert length_grouped_batches(lengths, 4, 3) != length_grouped_batches(lengths, 4, 4)
    stream = micro_batches(lengths, 4, seed=3)
    first_epoch = [next(stream) for _ in range(13)]
    assert first_epoch == length_grouped_batches(lengths, 4, 3)
    assert next(stream) == length_grouped_batches(lengths, 4, 4)[0]


def test_shards_are_disjoint_and_equal():
    batches = [[i] for i in range(11)]
    shards = [shard(batches, rank, 4) for rank in range(4)]
    assert all(len(s) == 2 for s in shards)
    assert len({i for s in shards for b in s for i in b}) == 8
    assert shard(batches[:1], 1, 2) == [[0]]  # fewer batches than processes: still one each


def test_collate_pads_right_and_labels_padding_ignored():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
