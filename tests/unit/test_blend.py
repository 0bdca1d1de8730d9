"""Blends as configured (list and Megatron's flat form, Megatron's split) and as drawn (BlendSchedule, phases)."""

from __future__ import annotations

import numpy as np
import pytest

from trainrun.config.blend import DataSource, parse_blend, parse_split, split_bounds
from trainrun.data.blend import BlendPhase, BlendSchedule
from trainrun.data.loader import BatchIterator, BlendedStream, SampleStream
from trainrun.errors import ConfigError

# ---------------------------------------------------------------- the config forms


def test_list_and_flat_forms_name_the_same_sources() -> None:
    listed = parse_blend([{"name": "a", "weight": 0.7, "path": "/d/a"}, {"weight": 0.3, "path": "/d/b/"}], "data.blend")
    flat = parse_blend("0.7 /d/a 0.3 /d/b/", "data.blend")
    assert listed == flat == (DataSource("a", "/d/a", 0.7), DataSource("b", "/d/b/", 0.3))
    assert parse_blend("/d/only", "data.blend") == (DataSource("only", "/d/only", 1.0),)
    assert parse_blend(None, "data.blend") is None


@pytest.mark.parametrize(("value", "field", "says"), [
    ("0.7 /a 0.3", "data.blend", "alternates weights and paths"),
    ("x /a 0.3 /b", "data.blend", "should be a weight"),
    ([{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}], "data.blend.1.name", "share this name"),
    ([{"name": "a", "path": "/a", "weight": -1}], "data.blend.0.weight", ">= 0"),
    ([{"name": "a", "path": "/a", "weight": 0}], "data.blend.0.weight", "sum to 0"),
    ([{"name": "a", "path": "/a", "wieght": 2}], "data.blend.0.wieght", "not a blend entry field"),
    ([{"name": "a b", "path": "/a"}], "data.blend.0.name", "metric key"),
    ([{"name": "a"}], "data.blend.0.path", "needs a dataset directory"),
    ([{"name": "a", "path": "/a", "split": "test"}], "data.blend.0.split", "train, val"),
    ([], "data.blend", "empty blend"),
    ({"name": "a"}, "data.blend", "list of"),
])
def test_bad_blends_name_the_entry_and_the_fix(value, field, says) -> None:
    with pytest.raises(ConfigError, match=says) as err:
        parse_blend(value, "data.blend")
    assert err.value.field == field


def test_megatron_split_fractions_and_boundaries() -> None:
    assert parse_split("969,30,1") == pytest.approx((0.969, 0.03, 0.001))
    assert parse_split("98,2") == pytest.approx((0.98, 0.02, 0.0))
    assert parse_split(None) is None
    # Megatron's rule: each boundary rounded, the total's rounding error taken off every later boundary
    assert split_bounds(parse_split("969,30,1"), 1000) == (0, 969, 999, 1000)
    assert split_bounds(parse_split("1,1,1"), 10) == (0, 4, 7, 10)  # 3,6,9 short by one: every boundary moves
    assert split_bounds(parse_split("90,5,5"), 3) == (0, 3, 3, 3)
    for bad in ("a,b", "1,2,3,4", "-1,2", "0,1,0"):
        with pytest.raises(ConfigError, match="data.split"):
            parse_split(bad)


# ---------------------------------------------------------------- the schedule


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.25, 0.25], [1.0], [0.2, 0.0, 0.8], [1, 1, 1],
                                     [0.9, 0.05, 0.05], [3, 1e-3]])
def test_schedule_is_a_function_of_the_weights_and_the_index(weights) -> None:
    schedule = BlendSchedule(weights)
    seq = schedule.assign(0, 2000)
    counts = [0] * len(weights)
    total = sum(weights)
    worst = 0.0
    for n, (source, k) in enumerate(seq):
        assert k == counts[source]  # each source's own samples in order, none skipped or repeated
        counts[source] += 1
        worst = max(worst, *(abs(c - (n + 1) * w / total) for c, w in zip(counts, weights, strict=True)))
    assert worst < 1.0  # realised counts stay within one sample of the requested shares
    for start in (0, 1, 17, 999, 1999):  # any window, computed alone, agrees with the whole sequence
        assert schedule.assign(start, 1) == seq[start : start + 1]
        assert schedule.counts_before(start) == [sum(1 for s, _ in seq[:start] if s == i) for i in range(len(weights))]
    assert schedule.assign(123, 400) == seq[123:523]
    assert BlendSchedule(list(weights)).assign(0, 2000) == seq  # a re-run draws the same


def test_shares_match_the_weights_within_one_percent_after_a_few_hundred_samples() -> None:
    schedule = BlendSchedule([0.6, 0.3, 0.1])
    counts = schedule.counts_before(300)
    assert [c / 300 for c in counts] == pytest.approx([0.6, 0.3, 0.1], abs=0.01)
    far = 10**12  # no index to build: any sample index is a few hundred integer operations
    assert [c / far for c in schedule.counts_before(far)] == pytest.approx([0.6, 0.3, 0.1], abs=1e-9)


def test_a_new_phase_continues_every_source_where_it_stopped() -> None:
    first = BlendPhase(("a", "b"), (0.5, 0.5))
    drawn = first.assign(0, 100)
    second = first.continued(("b", "a", "c"), (0.2, 0.2, 0.6), at=100)
    assert second.start == 100 and dict(zip(second.names, second.base, strict=True)) == {"b": 50, "a": 50, "c": 0}
    after = second.assign(100, 200)
    seen = {("a", k) for s, k in drawn if s == 0} | {("b", k) for s, k in drawn if s == 1}
    later = [(second.names[s], k) for s, k in after]
    assert not seen & set(later)  # nothing drawn twice
    for name in ("a", "b", "c"):  # and nothing skipped
        ks = sorted(k for n, k in [*((("a", "b")[s], k) for s, k in drawn), *later] if n == name)
        assert ks == list(range(len(ks)))
    with pytest.raises(ValueError, match="precedes"):
        second.assign(99, 1)


# ---------------------------------------------------------------- the blended stream and its state


def _stream(num_tokens: int, offset: int, seq_len: int = 4) -> SampleStream:
    return SampleStream(np.arange(offset, offset + num_tokens, dtype=np.int64), seq_len, seed=3)


def _blended(weights=(0.7, 0.3), allow: bool = False) -> BlendedStream:
    return BlendedStream([_stream(401, 0), _stream(81, 10_000)], ("big", "small"), weights, allow)


def _firsts(it: BatchIterator, steps: int) -> list[int]:
    return [int(v) for _ in range(steps) for v in next(it)[0][:, 0]]


def test_every_layout_and_a_resume_read_the_same_blended_samples() -> None:
    def global_order(mb: int, dp: int, steps: int) -> list[int]:
        iters = [BatchIterator(_blended(), mb, r, dp) for r in range(dp)]
        return [v for _ in range(steps) for it in iters for v in _firsts(it, 1)]

    reference = global_order(8, 1, 20)  # 160 samples: the small source (20 samples) wraps into its next epoch
    assert global_order(4, 2, 20) == reference == global_order(2, 4, 20)
    it = BatchIterator(_blended(), 8)
    _firsts(it, 7)
    state = it.state_dict()
    assert state["consumed_by_source"] == {"big": 39, "small": 17}
    resumed = BatchIterator(_blended(), 8)
    resumed.load_state_dict(state)
    assert _firsts(resumed, 13) == reference[56:]


def test_a_changed_blend_is_refused_unless_allowed() -> None:
    it = BatchIterator(_blended(), 8)
    _firsts(it, 5)
    state = it.state_dict()
    with pytest.raises(ConfigError, match="data.allow_blend_change") as err:
        BatchIterator(_blended((0.5, 0.5)), 8).load_state_dict(state)
    assert "big 0.7, small 0.3" in str(err.value) and "big 0.5, small 0.5" in str(err.value)
    allowed = BatchIterator(_blended((0.5, 0.5), allow=True), 8)
    allowed.load_state_dict(state)
    assert allowed.consumed_by_source() == state["consumed_by_source"]  # each source continues, none restarts
    _firsts(allowed, 10)
    after = allowed.consumed_by_source()
    assert after["big"] - 28 == pytest.approx(40, abs=1) and after["small"] - 12 == pytest.approx(40, abs=1)
    # saved again, the new blend resumes without the flag: it is the checkpoint's own blend now
    again = BatchIterator(_blended((0.5, 0.5)), 8)
    again.load_state_dict(allowed.state_dict())
    assert len(again.stream.phases) == 2 and again.consumed_by_source() == after


def test_checkpoints_from_before_blends_resume_a_single_source() -> None:
    one = BlendedStream([_stream(401, 0)], ("stdlib",), (1.0,))
    it = BatchIterator(one, 8)
    it.load_state_dict({"consumed_samples": 24, "seed": 3, "seq_len": 4})  # no "blend" key
    plain = SampleStream(np.arange(401, dtype=np.int64), 4, seed=3)
    assert _firsts(it, 1) == [int(plain.sample(g)[0]) for g in range(24, 32)]
