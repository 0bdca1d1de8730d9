"""Which source each global sample of a blend comes from: a function of the weights and the sample index alone.

Megatron's ``BlendedDataset`` assigns samples greedily (each next sample goes to the source whose
realised share lags its weight most), which is sequential: sample ``g``'s source is known only
after walking ``0..g-1``, so it caches an index array sized for the whole run. Here every source
``s`` instead emits its ``k``-th sample at the time ``(2k + 1) * P_s``, where ``P_s`` is its period
(inversely proportional to its weight), and the blend is all sources' emissions in time order (ties
to the lower source index). This is stride scheduling, the Sainte-Laguë sequence:

* after any ``n`` samples each source's count is within about one sample of ``n * weight`` (the
  same bound as Megatron's greedy), so realised shares match the weights within 1% after a few
  hundred samples;
* the counts before sample ``g`` follow from ``g`` by a binary search over the time axis in
  ``O(sources * log g)`` integer operations, so any batch is computed directly, with no index to
  build, cache or extend when a run grows;
* periods are exact Python integers (weights normalised to ``PERIOD_SCALE``), so every rank, node and
  re-run computes the identical sequence; no float rounding decides an order.

A :class:`BlendPhase` is a blend that starts at a global sample with each source's already-consumed
count as its base: changing the weights on resume (``data.allow_blend_change``) starts a new phase,
so every source continues where it stopped and no sample is repeated or skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

PERIOD_SCALE = 1 << 40  # weights are resolved to 1 part in 2**40 of the total


def periods(weights: Sequence[float]) -> list[int]:
    """Each source's integer period (0 for a weight of 0: the source is never drawn)."""
    total = sum(Fraction(w) for w in weights)
    if total <= 0:
        raise ValueError(f"blend weights {list(weights)} sum to {float(total)}; at least one must be positive")
    return [0 if w == 0 else max(1, round(PERIOD_SCALE * total / Fraction(w))) for w in weights]


class BlendSchedule:
    """The source of every global sample of a blend with fixed weights, and how many each source gave before it."""

    def __init__(self, weights: Sequence[float]):
        if any(w < 0 for w in weights):
            raise ValueError(f"blend weights must be >= 0, got {list(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.periods = periods(self.weights)
        self._active = [s for s, p in enumerate(self.periods) if p > 0]
        self._shortest = min(self.periods[s] for s in self._active)

    def _emitted_before(self, time: int) -> list[int]:
        """Samples each source emits strictly before ``time``: #{k >= 0 : (2k + 1) * P < time}."""
        return [0 if p == 0 or time <= p else (time - 1 - p) // (2 * p) + 1 for p in self.periods]

    def _time_of(self, g: int) -> int:
        """The emission time of global sample ``g`` (the smallest time by which ``g + 1`` samples are out)."""
        lo, hi = 0, (2 * g + 1) * self._shortest  # the fastest source alone has emitted g + 1 by hi
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(self._emitted_before(mid + 1)) >= g + 1:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def counts_before(self, g: int) -> list[int]:
        """How many of global samples ``0..g-1`` each source gave."""
        if g < 0:
            raise ValueError(f"negative sample index {g}")
        if g == 0:
            return [0] * len(self.periods)
        time = self._time_of(g - 1)
        counts = self._emitted_before(time)
        extra = g - sum(counts)  # samples emitted exactly at `time`, taken in source order
        for s in self._active:
            if extra == 0:
                break
            if time % self.periods[s] == 0 and (time // self.periods[s]) % 2 == 1:
                counts[s] += 1
                extra -= 1
        return counts

    def assign(self, start: int, count: int) -> list[tuple[int, int]]:
        """``(source, index within the source)`` of global samples ``start .. start + count - 1``."""
        if count <= 0:
            return []
        base = self.counts_before(start)
        end = self._time_of(start + count - 1)
        events = []
        for s in self._active:
            p = self.periods[s]
            k = base[s]
            while (2 * k + 1) * p <= end:
                events.append(((2 * k + 1) * p, s, k))
                k += 1
        events.sort()
        return [(s, k) for _, s, k in events[:count]]


@dataclass
class BlendPhase:
    """A blend in force from global sample ``start`` on, each source counting on from ``base``."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    start: int = 0
    base: tuple[int, ...] = ()
    schedule: BlendSchedule = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.names, self.weights = tuple(self.names), tuple(float(w) for w in self.weights)
        self.base = tuple(int(b) for b in self.base) or (0,) * len(self.names)
        if not len(self.names) == len(self.weights) == len(self.base):
            raise ValueError(f"blend phase with {len(self.names)} names, {len(self.weights)} weights and "
                             f"{len(self.base)} base counts")
        self.schedule = BlendSchedule(self.weights)

    def counts_at(self, g: int) -> list[int]:
        """Samples each source has given by global sample ``g`` (``g >= start``), bases included."""
        return [b + c for b, c in zip(self.base, self.schedule.counts_before(g - self.start), strict=True)]

    def assign(self, start: int, count: int) -> list[tuple[int, int]]:
        """``(source, index within the source)`` of global samples ``start ..`` (all ``>= self.start``)."""
        if start < self.start:
            raise ValueError(f"sample {start} precedes this blend phase, which starts at sample {self.start}")
        return [(s, self.base[s] + k) for s, k in self.schedule.assign(start - self.start, count)]

    def state_dict(self) -> dict:
        """JSON-able: names, weights, start and base counts."""
        return {"names": list(self.names), "weights": list(self.weights), "start": self.start,
                "base": list(self.base)}

    @classmethod
    def from_state_dict(cls, state: dict) -> BlendPhase:
        """The phase :meth:`state_dict` described."""
        return cls(tuple(state["names"]), tuple(state["weights"]), int(state["start"]), tuple(state["base"]))

    def same_blend(self, names: Sequence[str], weights: Sequence[float]) -> bool:
        """Whether ``names``/``weights`` are this phase's blend (weights compared as normalised shares)."""
        if tuple(names) != self.names:
            return False
        return periods(weights) == self.schedule.periods

    def describe(self) -> str:
        """``web 0.7, code 0.3`` (normalised shares)."""
        total = sum(self.weights)
        return ", ".join(f"{n} {w / total:.4g}" for n, w in zip(self.names, self.weights, strict=True))

    def continued(self, names: Sequence[str], weights: Sequence[float], at: int) -> BlendPhase:
        """A new phase from global sample ``at`` with the new blend; each source it keeps continues its count."""
        counts = dict(zip(self.names, self.counts_at(at), strict=True))
        return BlendPhase(tuple(names), tuple(weights), at, tuple(counts.get(n, 0) for n in names))


def refuse_blend_change(saved: list[dict] | None, names: Sequence[str], weights: Sequence[float],
                        consumed: int) -> None:
    """Raise the one-line refusal when the checkpoint's blend (its data state's phases) is not this run's.

    One source then and now is never a blend change (whether it holds the same data is the data checksum's
    question). Called before the model is built, and again when the data state is loaded.
    """
    from trainrun.errors import ConfigError

    if not saved:
        if len(names) == 1:
            return
        saved = [BlendPhase(("<single source>",), (1.0,)).state_dict()]
    last = BlendPhase.from_state_dict(saved[-1])
    if (len(last.names) == 1 and len(names) == 1) or last.same_blend(names, weights):
        return
    asked = BlendPhase(tuple(names), tuple(weights))
    raise ConfigError("data.allow_blend_change", False,
                      f"the checkpoint trained on the blend [{last.describe()}] but this run asks for "
                      f"[{asked.describe()}]; restore the blend, or continue with the new one from sample "
                      f"{consumed} with data.allow_blend_change=true")
