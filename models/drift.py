r"""Drift detection over named signals with river's ADWIN and Page-Hinkley detectors.

A recommender degrades silently: tastes move, a new cluster of items takes over, the audience
changes. The prequential errors (each prediction made before its rating is learned), the
top-N hits, the click-through per variant and the divergence of the item and user
distributions are streams whose mean shifts when that happens; a change detector on each turns
the shift into a dated event that an operator can see and act on.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from river import drift

__all__ = [
    "DETECTORS",
    "PER_EVENT",
    "PER_WINDOW",
    "DriftMonitor",
    "Firing",
    "Watch",
    "WindowDivergence",
    "jensen_shannon",
    "total_variation",
]

DETECTORS = ("adwin", "page_hinkley")
MODES = ("up", "down", "both")


@dataclass(frozen=True)
class Firing:
    """One detection: which detector fired on which signal, when, and what moved.

    ``before`` is the signal's mean since this detector last fired (or since monitoring
    began), ``after`` the mean of its most recent values; ``position`` counts the values
    the signal had received, ``ts`` is the event time the caller gave with the value.
    """

    signal: str
    detector: str
    ts: float
    position: int
    before: float
    after: float

    def as_dict(self) -> dict[str, Any]:
        """The firing as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Watch:
    r"""How one signal is watched; thresholds in units of the signal's warm-up deviation.

    Parameters
    ----------
    mode
        The direction in which the signal gets worse: ``"up"`` (an error, a divergence),
        ``"down"`` (a hit or click-through rate) or ``"both"``. Page-Hinkley tests that
        direction; ADWIN, two-sided by construction, has its cuts kept only when the newer
        window's mean moved that way.
    block
        Consecutive values averaged into one before the detectors see it. One absolute
        error is skewed and heavy-tailed; the mean of 25 is close to Gaussian (central limit
        theorem), which is what the thresholds' false-alarm rates assume.
    warmup
        Values (block means, when ``block > 1``) spent measuring :math:`\mu_0, \sigma_0`
        before detection starts.
    reference_halflife
        ``None``: the reference stays the warm-up's :math:`\mu_0, \sigma_0`. A number: the
        reference mean and variance are exponentially weighted moving averages of the values
        seen so far, with this half-life (in values, or block means), each value judged
        against the reference before it. A model still learning makes its errors fall for
        a long time; against a fixed reference that trend hides a rise (and Page-Hinkley's
        own mean since the start still holds the early, large errors), against a slow
        moving one it does not, while a change faster than the half-life stands out.
    adwin_delta
        ADWIN's confidence :math:`\delta`.
    adwin_clock
        How often (in values) ADWIN checks for a cut.
    ph_delta
        Page-Hinkley's tolerated drift :math:`\delta`, in standard deviations.
    ph_threshold
        Page-Hinkley's threshold :math:`\lambda`, in standard deviations.
    ph_min_instances
        Values Page-Hinkley needs (after the warm-up and after each firing) before it fires.
    recent
        How many of the signal's latest values make its current mean (a firing's ``after``).
    ph_alpha
        Page-Hinkley's forgetting factor on its sums (river's default); 1 is Page's CUSUM
        without forgetting, which fires about a third as often on a level stream but, after
        a long prefix, reacts far later to a shift.
    """

    mode: str = "both"
    block: int = 1
    warmup: int = 500
    reference_halflife: float | None = None
    adwin_delta: float = 0.002
    adwin_clock: int = 32
    ph_delta: float = 0.05
    ph_threshold: float = 50.0
    ph_min_instances: int = 30
    ph_alpha: float = 0.9999
    recent: int = 100

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.warmup < 2:
            raise ValueError("warmup must be at least 2 values, to measure a standard deviation")
        if self.block < 1:
            raise ValueError("block must be at least 1 value")
        if self.reference_halflife is not None and self.reference_halflife <= 0:
            raise ValueError("reference_halflife must be positive (or None, a fixed reference)")


# A value per window of events (a divergence): few values, each an average already, so a
# shift shows in one or two of them; 20 windows of warm-up, then a 0.5 sigma tolerance and
# a threshold of 8 sigma (a mean run of exp(8) / 0.5 = 6,000 windows at no shift).
PER_WINDOW = Watch(
    mode="up",
    warmup=20,
    adwin_clock=1,
    ph_delta=0.5,
    ph_threshold=8.0,
    ph_min_instances=5,
    recent=3,
)
# A value per event (an error): averaged in blocks of 25, each block mean judged against a
# moving reference (half-life 100 blocks, 2,500 values), so that the errors' slow fall while
# a model learns is not taken for a change. In units of a block mean's deviation, Page's
# CUSUM with a tolerated drift of 0.5 and a threshold of 10 runs about
# (exp(2 * 0.5 * (10 + 1.166)) - 1) / (2 * 0.5**2) = 140,000 blocks between false alarms on a
# level Gaussian stream (Siegmund's approximation) and sees a shift of one block deviation
# (a fifth of one error's deviation) after about (10 + 1.166) / 0.5 = 22 blocks, 560 values.
PER_EVENT = replace(
    PER_WINDOW,
    block=25,
    reference_halflife=100.0,
    ph_threshold=10.0,
    ph_alpha=1.0,
    recent=100,
)


@dataclass
class _Mean:
    """Running mean (Welford) and variance of a stream of floats."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


@dataclass
class _Reference:
    """Exponentially weighted mean and variance: the moving reference of a signal."""

    mean: float
    var: float
    alpha: float

    def update(self, x: float) -> None:
        delta = x - self.mean
        self.mean += self.alpha * delta
        self.var = (1.0 - self.alpha) * (self.var + self.alpha * delta * delta)


@dataclass
class _Signal:
    """A signal's warm-up scale, its detectors, and the means reported with a firing."""

    watch: Watch
    warmup: _Mean = field(default_factory=_Mean)
    reference: _Reference | None = None
    block_sum: float = 0.0
    block_n: int = 0
    detectors: dict[str, Any] = field(default_factory=dict)
    since_firing: dict[str, _Mean] = field(default_factory=dict)
    recent: deque[float] = field(default_factory=deque)
    count: int = 0


class DriftMonitor:
    r"""ADWIN and Page-Hinkley on every named signal, each firing recorded with its context.

    Every signal first spends its `Watch`'s ``warmup`` values measuring its own mean
    :math:`\mu_0` and standard deviation :math:`\sigma_0`; from then on both detectors see
    the standardised value :math:`z = (x - \mu_0) / \sigma_0` (with a moving reference,
    ``reference_halflife``, :math:`\mu, \sigma` follow the signal slowly; with ``block``,
    :math:`x` is the mean of that many values). The detectors' parameters are therefore in
    units of each signal's own noise, so one setting serves the absolute rating error of
    any model on any dataset without tuning per stream (`PER_EVENT`), and another any
    windowed divergence or click-through (`PER_WINDOW`).

    * **ADWIN** (Bifet & Gavaldà, 2007, *Learning from time-changing data with adaptive
      windowing*) keeps the longest window whose every split into an older part
      :math:`W_0` and a newer :math:`W_1` has means closer than
      :math:`\epsilon_{cut} = \sqrt{\tfrac{2}{m}\sigma_W^2 \ln\tfrac{2}{\delta'}} +
      \tfrac{2}{3m}\ln\tfrac{2}{\delta'}` (:math:`m` the harmonic mean of the parts'
      sizes), with false-alarm rate bounded by ``adwin_delta``; it detects when it drops
      the old part, and the monitor keeps the detection when the kept, newer part's mean
      moved in the watched direction.
    * **Page-Hinkley** (Page, 1954, *Continuous inspection schemes*; Hinkley, 1971) sums
      :math:`m_T = \sum_{t \le T} (z_t - \bar z_t - \delta)` and fires when
      :math:`m_T - \min_{t \le T} m_t > \lambda` (for increases; mirrored for decreases),
      a CUSUM against the running mean: ``ph_delta`` (:math:`\delta`) is the drift that is
      tolerated, ``ph_threshold`` (:math:`\lambda`) trades delay for false alarms.

    The detectors are river's own ``drift.ADWIN`` and ``drift.PageHinkley``, fed value by
    value: the monitor fires exactly when they do. A firing records the signal's mean since
    the detector last fired (``before``) and over its `Watch`'s last ``recent`` values
    (``after``).

    Parameters
    ----------
    watches
        How each signal is watched; a signal not named here gets ``default``.
    default
        The `Watch` of the signals not in ``watches``.
    history
        How many firings the monitor keeps (the oldest are dropped first).

    Examples
    --------
    >>> import random
    >>> rng = random.Random(1)
    >>> monitor = DriftMonitor({"rating_error": Watch(mode="up", warmup=200)})
    >>> errors = [abs(rng.gauss(0, 0.5)) for _ in range(3000)]
    >>> errors += [abs(rng.gauss(0, 1.0)) for _ in range(1000)]  # the model gets worse
    >>> for t, error in enumerate(errors):
    ...     _ = monitor.update("rating_error", error, ts=float(t))
    >>> for firing in monitor.firings:  # mean since the start, mean of the last 100 values
    ...     print(firing.detector, firing.ts, round(firing.before, 2), round(firing.after, 2))
    page_hinkley 3021.0 0.4 0.52
    adwin 3047.0 0.41 0.62
    page_hinkley 3781.0 0.77 0.86
    >>> monitor.detections["rating_error", "adwin"], round(monitor.means()["rating_error"], 2)
    (1, 0.86)
    """

    def __init__(
        self,
        watches: Mapping[str, Watch] | None = None,
        *,
        default: Watch = PER_EVENT,
        history: int = 100,
    ) -> None:
        self.watches = dict(watches or {})
        self.default = default
        self.firings: deque[Firing] = deque(maxlen=history)
        self.detections: Counter[tuple[str, str]] = Counter()
        self._signals: dict[str, _Signal] = {}

    def _signal(self, name: str) -> _Signal:
        signal = self._signals.get(name)
        if signal is None:
            watch = self.watches.get(name, self.default)
            signal = _Signal(watch=watch, recent=deque(maxlen=watch.recent))
            self._signals[name] = signal
        return signal

    @staticmethod
    def _detectors(watch: Watch) -> dict[str, Any]:
        return {
            "adwin": drift.ADWIN(delta=watch.adwin_delta, clock=watch.adwin_clock),
            "page_hinkley": drift.PageHinkley(
                min_instances=watch.ph_min_instances,
                delta=watch.ph_delta,
                threshold=watch.ph_threshold,
                alpha=watch.ph_alpha,
                mode=watch.mode,
            ),
        }

    def update(self, signal: str, value: float, ts: float) -> list[Firing]:
        """Feed one value of ``signal`` observed at event time ``ts``; return any firings."""
        state = self._signal(signal)
        state.count += 1
        state.recent.append(value)
        watch = state.watch
        if watch.block > 1:
            state.block_sum += value
            state.block_n += 1
            if state.block_n < watch.block:
                return []
            value = state.block_sum / state.block_n
            state.block_sum, state.block_n = 0.0, 0
        if not state.detectors:
            state.warmup.update(value)
            if state.warmup.n >= watch.warmup:
                state.detectors = self._detectors(watch)
                state.since_firing = {name: _Mean() for name in state.detectors}
                if watch.reference_halflife is not None:
                    alpha = 1.0 - 0.5 ** (1.0 / watch.reference_halflife)
                    state.reference = _Reference(state.warmup.mean, state.warmup.std**2, alpha)
            return []
        return self._detect(signal, state, value, ts)

    def _detect(self, signal: str, state: _Signal, value: float, ts: float) -> list[Firing]:
        """Feed one value (or block mean), standardised by the reference, to the detectors."""
        watch = state.watch
        z_fixed = (value - state.warmup.mean) / (state.warmup.std or 1.0)
        z_moving = z_fixed
        if state.reference is not None:
            z_moving = (value - state.reference.mean) / (math.sqrt(state.reference.var) or 1.0)
            state.reference.update(value)
        fired: list[Firing] = []
        for name, detector in state.detectors.items():
            estimation = detector.estimation if name == "adwin" else 0.0
            # ADWIN adapts its own window to a trend; Page-Hinkley compares each value with
            # its mean since it last fired, which a trend biases: it gets the moving reference.
            detector.update(z_fixed if name == "adwin" else z_moving)
            since = state.since_firing[name]
            if not detector.drift_detected:
                since.update(value)
                continue
            if name == "adwin" and not _moved(watch.mode, estimation, detector.estimation):
                since.update(value)
                continue
            after = sum(state.recent) / len(state.recent)
            firing = Firing(signal, name, ts, state.count, since.mean if since.n else after, after)
            fired.append(firing)
            self.firings.append(firing)
            self.detections[signal, name] += 1
            state.since_firing[name] = _Mean()
        return fired

    def update_many(self, signal: str, values: Iterable[float], ts: float) -> list[Firing]:
        """Feed several values of ``signal`` that share one event time (a batch)."""
        fired: list[Firing] = []
        for value in values:
            fired += self.update(signal, value, ts)
        return fired

    def means(self) -> dict[str, float]:
        """Each signal's mean over its most recent values (the current level of the signal)."""
        return {
            name: sum(state.recent) / len(state.recent)
            for name, state in self._signals.items()
            if state.recent
        }


def _moved(mode: str, before: float, after: float) -> bool:
    """Whether a mean went from ``before`` to ``after`` in the direction ``mode`` watches."""
    return mode == "both" or (after > before if mode == "up" else after < before)


def _distributions(
    p: Mapping[Hashable, float], q: Mapping[Hashable, float]
) -> tuple[list[float], list[float]]:
    """Both count maps normalised to probabilities over the union of their keys."""
    p_total, q_total = sum(p.values()), sum(q.values())
    if p_total <= 0 or q_total <= 0:
        raise ValueError("a divergence needs two non-empty distributions")
    keys = set(p) | set(q)
    return (
        [p.get(k, 0.0) / p_total for k in keys],
        [q.get(k, 0.0) / q_total for k in keys],
    )


def jensen_shannon(p: Mapping[Hashable, float], q: Mapping[Hashable, float]) -> float:
    r"""Jensen-Shannon divergence in bits of two count maps, in :math:`[0, 1]`.

    :math:`JS(P, Q) = \tfrac12 KL(P \| M) + \tfrac12 KL(Q \| M)`, :math:`M = \tfrac12 (P + Q)`
    (Lin, 1991): symmetric, and finite where one distribution has mass the other lacks, as a
    window of item counts always does.

    >>> jensen_shannon({"a": 1}, {"b": 3}), jensen_shannon({"a": 1, "b": 1}, {"a": 2, "b": 2})
    (1.0, 0.0)
    """
    ps, qs = _distributions(p, q)
    total = 0.0
    for a, b in zip(ps, qs, strict=True):
        m = 0.5 * (a + b)
        if a > 0:
            total += 0.5 * a * math.log2(a / m)
        if b > 0:
            total += 0.5 * b * math.log2(b / m)
    return max(0.0, min(1.0, total))


def total_variation(p: Mapping[Hashable, float], q: Mapping[Hashable, float]) -> float:
    r"""Total-variation distance :math:`\tfrac12 \sum_k |P_k - Q_k|` of two count maps.

    >>> total_variation({"a": 1}, {"a": 1, "b": 1})
    0.5
    """
    ps, qs = _distributions(p, q)
    return 0.5 * sum(abs(a - b) for a, b in zip(ps, qs, strict=True))


class WindowDivergence:
    r"""Divergence between the latest window of keys and a reference of the windows before it.

    Keys (item ids for the popularity distribution, user ids for the activity distribution)
    are counted in consecutive windows of ``window`` keys. Each time a window fills, its
    distribution is compared with the pooled counts of the ``reference_windows`` windows
    before it, and the divergence is emitted: a stream that stays level, at the sampling
    bias of two finite windows, while the distribution is stable, and jumps when the recent
    window is drawn from something else. That stream is what a `DriftMonitor` watches.

    Parameters
    ----------
    window
        Keys per window (one divergence value per window).
    reference_windows
        How many earlier windows make the reference.
    measure
        ``"js"`` (Jensen-Shannon, bits) or ``"tv"`` (total variation).

    Examples
    --------
    >>> div = WindowDivergence(window=4, reference_windows=1)
    >>> div.update(["a", "a", "b", "b"])  # the first window has no reference yet
    []
    >>> div.update(["a", "b", "a", "b", "c", "c", "c", "c"])
    [0.0, 1.0]
    """

    def __init__(self, window: int = 1000, reference_windows: int = 5, measure: str = "js"):
        if window < 1 or reference_windows < 1:
            raise ValueError("window and reference_windows must be at least 1")
        if measure not in ("js", "tv"):
            raise ValueError(f"measure must be 'js' or 'tv', not {measure!r}")
        self.window = window
        self.reference_windows = reference_windows
        self.measure = measure
        self._divergence = jensen_shannon if measure == "js" else total_variation
        self._current: Counter[Hashable] = Counter()
        self._filled = 0
        self._past: deque[Counter[Hashable]] = deque(maxlen=reference_windows)
        self._reference: Counter[Hashable] = Counter()

    def update(self, keys: Iterable[Hashable]) -> list[float]:
        """Count ``keys`` in order; return the divergence of every window they completed."""
        out: list[float] = []
        for key in keys:
            self._current[key] += 1
            self._filled += 1
            if self._filled == self.window:
                out += self._close()
        return out

    def _close(self) -> list[float]:
        current = self._current
        value = [self._divergence(current, self._reference)] if self._past else []
        if len(self._past) == self.reference_windows:
            self._reference.subtract(self._past[0])
            self._reference = +self._reference  # drop keys whose count fell to 0
        self._past.append(current)
        self._reference.update(current)
        self._current = Counter()
        self._filled = 0
        return value
