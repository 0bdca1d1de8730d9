"""What a blend's batches hold (issue 18 §5): each source's share of the samples, read back from the tokens.

Every source here has its own token range, so the source of each sample the ranks receive is read from
the sample itself, not from the schedule under test. After a few hundred samples the realised shares are
within 1% of the weights (what metrics.jsonl's ``samples/<name>`` reports), each source's samples are its
own stream's in order (none skipped or repeated, epochs wrapping), and after an allowed blend change the
shares since the change follow the new weights while every source continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from trainrun.data.loader import BatchIterator, BlendedStream, SampleStream

SEQ_LEN = 4
SPAN = 100_000  # source s owns tokens [s * SPAN, (s + 1) * SPAN)
SIZES = (401, 161, 81, 1201)  # 100, 40, 20 and 300 samples of 4 tokens: the small ones wrap into later epochs


def streams(count: int) -> list[SampleStream]:
    """``count`` shuffled sources with disjoint token ranges."""
    return [SampleStream(np.arange(s * SPAN, s * SPAN + SIZES[s], dtype=np.int64), SEQ_LEN, seed=7)
            for s in range(count)]


def blended(weights: Sequence[float], names: Sequence[str] | None = None, allow: bool = False) -> BlendedStream:
    names = names or [f"s{i}" for i in range(len(weights))]
    return BlendedStream(streams(len(weights)), names, weights, allow)


def draw(stream_of_rank, dp: int, mb: int, steps: int, consumed: int = 0, state: dict | None = None):
    """Run ``dp`` ranks for ``steps`` steps; return the rows in global order, and the ranks' iterators."""
    ranks = [BatchIterator(stream_of_rank(), mb, r, dp, consumed) for r in range(dp)]
    if state is not None:
        for it in ranks:
            it.load_state_dict(state)
    rows = [row for _ in range(steps) for it in ranks for row in next(it)[0].tolist()]
    return rows, ranks


def by_source(rows: list[list[int]], count: int) -> list[list[list[int]]]:
    """Rows grouped by the source their tokens come from (in the order drawn)."""
    groups: list[list[list[int]]] = [[] for _ in range(count)]
    for row in rows:
        source = row[0] // SPAN
        assert all(t // SPAN == source for t in row)  # a sample never mixes sources
        groups[source].append(row)
    return groups


def own_samples(source: int, first: int, count: int) -> list[list[int]]:
    """Samples ``first .. first + count - 1`` of the source's own shuffled stream (inputs only)."""
    stream = streams(source + 1)[source]
    return [stream.sample(k)[:-1].tolist() for k in range(first, first + count)]


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.6, 0.3, 0.1), (0.5, 0.25, 0.25), (0.85, 0.05, 0.05, 0.05),
                                     (2.0, 1.0, 0.0, 1.0)])
@pytest.mark.parametrize(("dp", "mb"), [(1, 8), (2, 4), (4, 3)])
def test_realised_shares_are_within_one_percent_of_the_weights(weights, dp, mb) -> None:
    steps = -(-480 // (dp * mb))  # ~480 samples: "a few hundred"
    rows, ranks = draw(lambda: blended(weights), dp, mb, steps)
    groups = by_source(rows, len(weights))
    total = sum(weights)
    shares = [len(g) / len(rows) for g in groups]
    assert shares == pytest.approx([w / total for w in weights], abs=0.01)
    for s, group in enumerate(groups):  # each source's own samples 0, 1, 2, ... in its shuffled order
        assert group == own_samples(s, 0, len(group)), f"source {s}"
    # What the training loop logs as samples/<name>: the same on every rank, and what the batches held.
    counts = {f"s{s}": len(g) for s, g in enumerate(groups)}
    assert all(it.consumed_by_source() == counts for it in ranks)
    assert all(it.state_dict()["consumed_by_source"] == counts for it in ranks)


def test_after_an_allowed_blend_change_the_shares_follow_the_new_weights() -> None:
    before, ranks = draw(lambda: blended((0.7, 0.3)), 2, 4, 25)  # 200 samples at 70/30
    state = ranks[0].state_dict()
    saved = [len(g) for g in by_source(before, 2)]
    assert state["consumed_by_source"] == {"s0": saved[0], "s1": saved[1]}
    after, ranks = draw(lambda: blended((0.2, 0.8), allow=True), 2, 4, 50, state=state)  # 400 more at 20/80
    groups = by_source(after, 2)
    assert [len(g) / len(after) for g in groups] == pytest.approx([0.2, 0.8], abs=0.01)
    for s, group in enumerate(groups):  # each source continues exactly where it stopped: no restart, no gap
        assert group == own_samples(s, saved[s], len(group)), f"source {s}"
    assert ranks[0].consumed_by_source() == {"s0": saved[0] + len(groups[0]), "s1": saved[1] + len(groups[1])}
    phases = ranks[0].state_dict()["blend"]
    assert [(p["start"], p["base"]) for p in phases] == [(0, [0, 0]), (200, saved)]


def test_a_source_added_by_a_blend_change_starts_at_its_first_sample() -> None:
    before, ranks = draw(lambda: blended((0.7, 0.3)), 1, 8, 25)
    state = ranks[0].state_dict()
    saved = [len(g) for g in by_source(before, 2)]
    after, ranks = draw(lambda: blended((0.4, 0.3, 0.3), allow=True), 1, 8, 50, state=state)
    groups = by_source(after, 3)
    assert [len(g) / len(after) for g in groups] == pytest.approx([0.4, 0.3, 0.3], abs=0.01)
    for s, first in enumerate([*saved, 0]):
        assert groups[s] == own_samples(s, first, len(groups[s])), f"source {s}"


def test_switching_a_one_source_blend_to_another_source_starts_the_new_one_at_its_first_sample() -> None:
    only_first = lambda: BlendedStream(streams(1), ["s0"], [1.0])  # noqa: E731
    _, ranks = draw(only_first, 1, 8, 4)
    state = ranks[0].state_dict()  # 32 samples of s0

    def only_second() -> BlendedStream:
        return BlendedStream(streams(2)[1:], ["s1"], [1.0], allow_blend_change=True)

    after, ranks = draw(only_second, 1, 8, 2, state=state)
    assert by_source(after, 2)[1] == own_samples(1, 0, 16)  # s1 has given nothing yet: it starts at its sample 0
    assert [p["names"] for p in ranks[0].state_dict()["blend"]] == [["s0"], ["s1"]]
