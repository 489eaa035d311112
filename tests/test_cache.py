"""KV-cache operations on real transformers cache objects: exact slices, positions, RoPE re-rotation."""

from __future__ import annotations

import torch

from prospect.cache import PositionedCache, cache_length, clone_cache, crop_end, keep_spans, make_contiguous, rerotate


def filled_cache(length: int = 20, layers: int = 3, capacity: int = 32) -> PositionedCache:
    torch.manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    cache = PositionedCache(capacity, inv_freq=inv_freq)
    positions = cache.take_positions(length)
    assert positions.tolist() == list(range(length))
    for layer in range(layers):
        cache.update(torch.randn(1, 2, length, 16), torch.randn(1, 2, length, 16), layer)
    return cache


def test_keep_spans_is_bitwise_and_tracks_positions():
    cache = filled_cache()
    before = [(k.clone(), v.clone()) for k, v in cache.layer_tensors()]
    keep_spans(cache, [(0, 4), (15, 20)])
    assert cache_length(cache) == 9 and cache.positions.tolist() == [0, 1, 2, 3, 15, 16, 17, 18, 19]
    for (k, v), (k0, v0) in zip(cache.layer_tensors(), before):
        assert torch.equal(k, torch.cat([k0[:, :, :4], k0[:, :, 15:]], dim=2))
        assert torch.equal(v, torch.cat([v0[:, :, :4], v0[:, :, 15:]], dim=2))
    assert cache.next_position == 20  # the running counter is untouched
    keep_spans(cache, [])
    assert cache_length(cache) == 0 and cache.positions.numel() == 0


def test_appending_after_eviction_writes_behind_the_kept_tokens():
    cache = filled_cache(length=10)
    keep_spans(cache, [(6, 10)])
    new_keys = torch.randn(1, 2, 3, 16)
    cache.take_positions(3)
    cache.update(new_keys, new_keys, 0)
    keys = next(iter(cache.layer_tensors()))[0]
    assert keys.shape[2] == 7 and torch.equal(keys[:, :, 4:], new_keys)
    assert cache.positions.tolist() == [6, 7, 8, 9, 10, 11, 12]


def test_crop_end_gives_positions_back():
    cache = filled_cache(length=12)
    crop_end(cache, 5)
    assert cache_length(cache) == 7 and cache.next_position == 7 and cache.positions.tolist() == list(range(7))


def test_buffer_never_grows_past_capacity():
    cache = filled_cache(length=30, layers=1, capacity=32)
    try:
        cache.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), 0)
    except RuntimeError as error:
        assert "capacity 32" in str(error)
    else:
        raise AssertionError("appending past capacity must fail")


def test_rerotation_composes_rope_rotations():
    torch.manual_seed(1)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    raw = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    at = lambda p: rerotate(raw, torch.full((5,), p), inv_freq.double())  # noqa: E731 - RoPE at position p
    moved = rerotate(at(900), torch.full((5,), -880), inv_freq.double())
    assert torch.allclose(moved, at(20), atol=1e-9)


def test_make_contiguous_rerotates_only_moved_keys():
    cache = filled_cache()
    keep_spans(cache, [(0, 4), (15, 20)])
    before = [k.clone() for k, _ in cache.layer_tensors()]
    make_contiguous(cache)
    assert cache.positions.tolist() == list(range(9)) and cache.next_position == 9
    for (k, _), k0 in zip(cache.layer_tensors(), before):
        assert torch.equal(k[:, :, :4], k0[:, :, :4])  # already at their positions
        expected = rerotate(k0[:, :, 4:], torch.full((5,), -11), cache.inv_freq)
        assert torch.allclose(k[:, :, 4:], expected, atol=1e-6)


def test_clone_is_independent():
    cache = filled_cache()
    copy = clone_cache(cache)
    keep_spans(cache, [(0, 2)])
    assert cache_length(copy) == 20 and copy.positions.tolist() == list(range(20))
