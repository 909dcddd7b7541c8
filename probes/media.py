"""Media arithmetic, pure: tone detection (Goertzel), the E-model MOS, RTP figures.

Nothing here touches pjsua2 or the network: the SIP engine records what a call
received into a WAV file (the conference bridge's own recorder, analysed offline),
and these functions turn samples and RTCP counters into the figures of a result.

Tone detection
    The audio is cut into 20 ms frames. For every frame, the energy ``E`` and, for
    each frequency we listen for (the responder's tone, our own echoed tone), the
    Goertzel power ``P(f)`` scaled so that a pure tone at ``f`` gives ``P(f) = E``.
    A frequency is present in a frame when the frame is louder than ``floor_dbfs``,
    ``P(f)`` is at least ``min_share`` of ``E`` (-25 dB: an echo may come back
    quieter than the responder's tone) and ``peak_ratio`` (10 dB) above the power at
    ``f +- 150`` and ``f +- 250`` Hz. A tone is *heard* when it is present in a run of
    consecutive frames at least ``min_run`` (300 ms) long. A different frequency,
    noise and speech are flat around ``f`` or have their peak elsewhere, so they are
    not mistaken for it; a second tone 400 Hz away does not mask the first.

In-band DTMF (``detect_dtmf``; ITU-T Q.23 frequencies, Q.24 acceptance in spirit)
    20 ms windows every 10 ms. Known steady tones (the responder's, our own) are first
    removed from each window by a least-squares sine fit at their frequency, so their
    leakage does not mask a digit. A window holds a digit when the strongest of the four
    row (697/770/852/941 Hz) and of the four column (1209/1336/1477/1633 Hz) Goertzel
    powers each reach ``min_dbfs``; every other tone of its group is ``relative_peak_db``
    (8 dB) below the strongest; the twist is within limits (column up to 8 dB above the
    row, row up to 4 dB above the column, spandsp's defaults); and the two tones carry at
    least ``min_share`` of what is left of the window's energy (speech and noise spread
    theirs). A digit is a run of windows with the same key lasting ``min_duration``
    (40 ms; 20 ms or less is never one); a break of ``min_gap`` (30 ms) or more between
    runs of the same key makes two digits, a shorter dropout is bridged.

E-model (ITU-T G.107, simplified as in Cole & Rosenbluth 2001)
    ``R = 93.2 - Id - Ie_eff`` with the default ``R0 - Is = 93.2``;
    ``Id = 0.024 d + 0.11 (d - 177.3) H(d - 177.3)`` for one-way delay ``d`` ms;
    ``Ie_eff = Ie + (95 - Ie) Ppl / (Ppl / BurstR + Bpl)`` (G.107 eq. 7-29) with
    ``Ie`` and ``Bpl`` from ITU-T G.113 Appendix I: G.711 ``Ie = 0``, ``Bpl = 25.1``
    with packet-loss concealment (pjmedia conceals G.711 loss), ``BurstR = 1``
    (random loss). MOS from R by G.107 Annex B (1.0 .. 4.5).
"""

from __future__ import annotations

import math
import sys
import wave
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

FRAME_SECONDS: Final = 0.02
NEIGHBOURS: Final = (150.0, 250.0)  # Hz either side of a tone where its frame has nulls
FULL_SCALE: Final = 32768.0

# ITU-T G.113 Appendix I, Table I.1/I.3: equipment impairment and packet-loss robustness.
CODEC_IMPAIRMENT: Final[Mapping[str, tuple[float, float]]] = {
    "PCMU": (0.0, 25.1),  # G.711 mu-law with packet-loss concealment
    "PCMA": (0.0, 25.1),  # G.711 A-law with packet-loss concealment
}
DEFAULT_CODEC: Final = "PCMU"


# ----------------------------------------------------------------------- tones


def goertzel_power(samples: Sequence[float], freq: float, rate: float) -> float:
    """Power of ``samples`` at ``freq`` Hz, scaled so that a pure tone at ``freq``
    (over whole cycles) gives the frame energy ``sum(x * x)``.

    The generalised Goertzel recurrence evaluates the DTFT at exactly ``freq``, so
    a tone that does not fall on an FFT bin is not attenuated (no scalloping).
    """
    n = len(samples)
    if n == 0:
        return 0.0
    w = 2.0 * math.pi * freq / rate
    coeff = 2.0 * math.cos(w)
    s1 = s2 = 0.0
    for x in samples:
        s0 = x + coeff * s1 - s2
        s2 = s1
        s1 = s0
    power = s1 * s1 + s2 * s2 - coeff * s1 * s2  # |X(w)|^2
    return max(0.0, 2.0 * power / n)


@dataclass(frozen=True, slots=True)
class ToneReport:
    """What the detector found for one frequency."""

    freq: float
    heard: bool
    frames: int  # frames in which the tone was present
    longest_run: float  # seconds, the longest run of consecutive frames
    first_at: float | None  # seconds from the start of the audio to the first qualifying run


def detect_tones(
    samples: Sequence[int] | Sequence[float],
    rate: int,
    freqs: Sequence[float],
    *,
    min_run: float = 0.3,
    min_share: float = 0.003,
    peak_ratio: float = 10.0,
    floor_dbfs: float = -50.0,
) -> dict[float, ToneReport]:
    """Which of ``freqs`` are in ``samples`` (16-bit scale), frame by frame; see module doc."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    frame = max(1, round(rate * FRAME_SECONDS))
    floor = (FULL_SCALE * 10.0 ** (floor_dbfs / 20.0)) ** 2 * frame  # energy of a frame at the floor
    need = max(1, math.ceil(min_run / FRAME_SECONDS - 1e-9))
    present: dict[float, list[bool]] = {f: [] for f in freqs}
    for start in range(0, len(samples) - frame + 1, frame):
        chunk = [float(v) for v in samples[start : start + frame]]
        energy = sum(v * v for v in chunk)
        for f in freqs:
            present[f].append(
                energy >= floor
                and _tone_in_frame(chunk, f, rate, energy=energy, min_share=min_share, peak_ratio=peak_ratio)
            )
    out: dict[float, ToneReport] = {}
    for f in freqs:
        flags = present[f]
        longest = run = 0
        first: int | None = None
        for i, flag in enumerate(flags):
            run = run + 1 if flag else 0
            longest = max(longest, run)
            if first is None and run >= need:
                first = i - run + 1
        out[f] = ToneReport(
            freq=f,
            heard=first is not None,
            frames=sum(flags),
            longest_run=longest * FRAME_SECONDS,
            first_at=None if first is None else first * FRAME_SECONDS,
        )
    return out


def _tone_in_frame(
    chunk: Sequence[float], freq: float, rate: float, *, energy: float, min_share: float, peak_ratio: float
) -> bool:
    """``freq`` carries at least ``min_share`` of the frame and stands ``peak_ratio``
    above its neighbourhood (+-150 and +-250 Hz: nulls of a 20 ms frame for tones on
    the 50 Hz grid), so speech, noise and other tones do not count."""
    power = goertzel_power(chunk, freq, rate)
    if power < min_share * energy:
        return False
    nyquist = rate / 2.0
    for offset in NEIGHBOURS:
        for g in (freq - offset, freq + offset):
            if 0 < g < nyquist and goertzel_power(chunk, g, rate) * peak_ratio > power:
                return False
    return True


DTMF_ROWS: Final = (697.0, 770.0, 852.0, 941.0)
DTMF_COLUMNS: Final = (1209.0, 1336.0, 1477.0, 1633.0)
DTMF_KEYS: Final = ("123A", "456B", "789C", "*0#D")  # DTMF_KEYS[row][column]
DTMF_HOP: Final = 0.01  # seconds between the starts of two 20 ms DTMF windows
DTMF_ON: Final = 0.1  # one in-band digit as the probe plays it: 100 ms of tone pair,
DTMF_OFF: Final = 0.1  # then 100 ms of silence (Q.24 asks for 40 ms of each at least)


@dataclass(frozen=True, slots=True)
class DtmfDigit:
    """One in-band digit: its key and when it sounded (seconds from the start of the audio)."""

    digit: str
    start: float
    end: float


def dtmf_pair(digit: str) -> tuple[float, float]:
    """The (row, column) frequencies of a DTMF key (0-9, *, #, A-D)."""
    for r, keys in enumerate(DTMF_KEYS):
        if digit in keys:
            return DTMF_ROWS[r], DTMF_COLUMNS[keys.index(digit)]
    raise ValueError(f"{digit!r} is not a DTMF key")


def detect_dtmf(
    samples: Sequence[int] | Sequence[float],
    rate: int,
    *,
    ignore: Sequence[float] = (),
    min_duration: float = 0.04,
    min_gap: float = 0.03,
    min_dbfs: float = -40.0,
    relative_peak_db: float = 8.0,
    max_twist_db: float = 8.0,
    max_reverse_twist_db: float = 4.0,
    min_share: float = 0.6,
) -> list[DtmfDigit]:
    """The in-band DTMF digits in ``samples`` (16-bit scale), in order; ``ignore``: steady
    tones removed first (see module doc)."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    window = max(1, round(rate * FRAME_SECONDS))
    hop = max(1, round(rate * DTMF_HOP))
    nyquist = rate / 2.0
    known = [_sine_basis(f, rate, window) for f in ignore if 0 < f < nyquist]
    judge = _DtmfJudge(
        window=window,
        rate=rate,
        min_dbfs=min_dbfs,
        relative_peak=10.0 ** (relative_peak_db / 10.0),
        twist=10.0 ** (max_twist_db / 10.0),
        reverse_twist=10.0 ** (max_reverse_twist_db / 10.0),
        min_share=min_share,
    )
    keys: list[str | None] = []
    for start in range(0, len(samples) - window + 1, hop):
        chunk = [float(v) for v in samples[start : start + window]]
        for basis in known:
            chunk = _remove_sine(chunk, basis)
        keys.append(judge.key(chunk))
    return _dtmf_runs(
        keys,
        hop=hop / rate,
        window=window / rate,
        need=max(1, math.ceil((min_duration - window / rate) / (hop / rate) - 1e-9) + 1),
        gap=max(1, math.ceil(min_gap / (hop / rate) - 1e-9)),
    )


@dataclass(frozen=True, slots=True)
class _DtmfJudge:
    """Whether one window holds a DTMF key (the per-window tests of ``detect_dtmf``)."""

    window: int
    rate: int
    min_dbfs: float
    relative_peak: float
    twist: float
    reverse_twist: float
    min_share: float

    def key(self, chunk: Sequence[float]) -> str | None:
        rows = [goertzel_power(chunk, f, self.rate) for f in DTMF_ROWS]
        cols = [goertzel_power(chunk, f, self.rate) for f in DTMF_COLUMNS]
        r = max(range(4), key=rows.__getitem__)
        c = max(range(4), key=cols.__getitem__)
        low, high = rows[r], cols[c]
        # a full-scale sine gives FULL_SCALE**2 * window / 2
        floor = FULL_SCALE**2 * self.window / 2.0 * 10.0 ** (self.min_dbfs / 10.0)
        if low < floor or high < floor:
            return None
        if high > low * self.twist or low > high * self.reverse_twist:
            return None
        if any(p * self.relative_peak > low for i, p in enumerate(rows) if i != r):
            return None
        if any(p * self.relative_peak > high for i, p in enumerate(cols) if i != c):
            return None
        if low + high < self.min_share * sum(v * v for v in chunk):
            return None
        return DTMF_KEYS[r][c]


def _dtmf_runs(
    keys: Sequence[str | None], *, hop: float, window: float, need: int, gap: int
) -> list[DtmfDigit]:
    """Digits from the per-window keys: runs of one key at least ``need`` windows long; a
    run of the same key after fewer than ``gap`` other windows continues the digit."""
    runs: list[tuple[str, int, int]] = []  # key, first window, last window
    i = 0
    while i < len(keys):
        key = keys[i]
        if key is None:
            i += 1
            continue
        j = i
        while j + 1 < len(keys) and keys[j + 1] == key:
            j += 1
        if runs and runs[-1][0] == key and i - runs[-1][2] - 1 < gap:
            runs[-1] = (key, runs[-1][1], j)  # a dropout inside one digit
        else:
            runs.append((key, i, j))
        i = j + 1
    return [
        DtmfDigit(key, round(first * hop, 3), round(last * hop + window, 3))
        for key, first, last in runs
        if last - first + 1 >= need
    ]


def _sine_basis(
    freq: float, rate: int, n: int
) -> tuple[list[float], list[float], tuple[float, float, float]]:
    """cos and sin at ``freq`` over ``n`` samples and the inverse of their Gram matrix
    (``a, b, c`` of ``[[a, b], [b, c]]``), for a least-squares fit."""
    w = 2.0 * math.pi * freq / rate
    cos = [math.cos(w * i) for i in range(n)]
    sin = [math.sin(w * i) for i in range(n)]
    cc = sum(v * v for v in cos)
    ss = sum(v * v for v in sin)
    cs = sum(a * b for a, b in zip(cos, sin, strict=True))
    det = cc * ss - cs * cs
    return cos, sin, (ss / det, -cs / det, cc / det)


def _remove_sine(
    chunk: list[float], basis: tuple[list[float], list[float], tuple[float, float, float]]
) -> list[float]:
    """``chunk`` minus its least-squares sine at the basis frequency."""
    cos, sin, (a, b, c) = basis
    xc = sum(x * v for x, v in zip(chunk, cos, strict=True))
    xs = sum(x * v for x, v in zip(chunk, sin, strict=True))
    p, q = a * xc + b * xs, b * xc + c * xs
    return [x - p * u - q * v for x, u, v in zip(chunk, cos, sin, strict=True)]


def dtmf_tones(
    digits: str,
    rate: int,
    *,
    on: float = DTMF_ON,
    off: float = DTMF_OFF,
    dbfs: float = -14.0,
    twist_db: float = 0.0,
) -> list[int]:
    """``digits`` as DTMF tone pairs, ``on`` seconds each with ``off`` of silence after
    (tests); ``twist_db``: the column tone that much louder than the row tone."""
    out: list[int] = []
    n_on, n_off = round(rate * on), round(rate * off)
    for digit in digits:
        row, col = dtmf_pair(digit)
        a_row = FULL_SCALE * 10.0 ** (dbfs / 20.0)
        a_col = a_row * 10.0 ** (twist_db / 20.0)
        out.extend(
            max(
                -32768,
                min(
                    32767,
                    round(
                        a_row * math.sin(2 * math.pi * row * i / rate)
                        + a_col * math.sin(2 * math.pi * col * i / rate)
                    ),
                ),
            )
            for i in range(n_on)
        )
        out.extend([0] * n_off)
    return out


def tone(freq: float, rate: int, seconds: float, *, dbfs: float = -10.0, phase: float = 0.0) -> list[int]:
    """A sine tone as 16-bit samples (tests and the synthetic announcement check)."""
    amplitude = FULL_SCALE * 10.0 ** (dbfs / 20.0)
    n = round(rate * seconds)
    return [
        max(-32768, min(32767, round(amplitude * math.sin(2 * math.pi * freq * i / rate + phase))))
        for i in range(n)
    ]


def read_wav(path: str | Path) -> tuple[array[int], int]:
    """Samples and rate of a 16-bit mono PCM WAV (what pjmedia's recorder writes).

    Raises ValueError for anything else; a truncated file yields what is there.
    """
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise ValueError(f"{path}: want 16-bit mono PCM")
            rate = w.getframerate()
            data = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a readable WAV file: {exc}") from None
    samples = array("h")
    samples.frombytes(data[: len(data) - len(data) % 2])
    if sys.byteorder == "big":
        samples.byteswap()
    return samples, rate


def wav_complete(path: str | Path) -> bool:
    """True once a WAV file's RIFF header has been finalised (pjmedia writes the sizes
    when the recorder is destroyed, which its media clock thread does a little later)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            f.seek(0, 2)
            size = f.tell()
    except OSError:
        return False
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return False
    return int.from_bytes(head[4:8], "little") == size - 8 and size > 44


def wav_duration(path: str | Path) -> float:
    """Length of a WAV file in seconds."""
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes() / float(w.getframerate())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a readable WAV file: {exc}") from None


# --------------------------------------------------------------------- E-model


def delay_impairment(one_way_delay_ms: float) -> float:
    """Id for a one-way mouth-to-ear delay (G.107 simplified)."""
    d = max(0.0, one_way_delay_ms)
    return 0.024 * d + (0.11 * (d - 177.3) if d > 177.3 else 0.0)


def effective_equipment_impairment(
    loss: float, *, ie: float = 0.0, bpl: float = 25.1, burst_r: float = 1.0
) -> float:
    """Ie_eff for a packet-loss fraction ``loss`` (0..1), G.107 eq. 7-29."""
    ppl = 100.0 * min(1.0, max(0.0, loss))
    return ie + (95.0 - ie) * ppl / (ppl / burst_r + bpl)


def r_factor(*, one_way_delay_ms: float, loss: float, codec: str = DEFAULT_CODEC) -> float:
    ie, bpl = CODEC_IMPAIRMENT.get(codec.upper(), CODEC_IMPAIRMENT[DEFAULT_CODEC])
    return 93.2 - delay_impairment(one_way_delay_ms) - effective_equipment_impairment(loss, ie=ie, bpl=bpl)


def mos_from_r(r: float) -> float:
    """G.107 Annex B: R -> MOS (CQE), 1.0 .. 4.5."""
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    # the polynomial dips just below 1.0 for 0 < R < ~6.5; MOS is defined on 1 .. 4.5
    return max(1.0, 1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7e-6)


def one_way_delay(*, rtt_ms: float | None, jitter_ms: float, ptime_ms: float = 20.0) -> float:
    """Mouth-to-ear delay estimate: half the RTCP round trip (0 when RTCP gave none),
    one packet of packetisation, and a jitter buffer of one packet plus twice the jitter."""
    network = rtt_ms / 2.0 if rtt_ms is not None and rtt_ms > 0 else 0.0
    return network + ptime_ms + (ptime_ms + 2.0 * max(0.0, jitter_ms))


def estimate_mos(*, loss: float, jitter_ms: float, rtt_ms: float | None, codec: str = DEFAULT_CODEC) -> float:
    """E-model MOS for what one call measured; rounded to 2 decimals."""
    d = one_way_delay(rtt_ms=rtt_ms, jitter_ms=jitter_ms)
    return round(mos_from_r(r_factor(one_way_delay_ms=d, loss=loss, codec=codec)), 2)


# ------------------------------------------------------------------ RTP figures


def loss_fraction(received: int, lost: int) -> float:
    """Lost over expected (received + lost), 0 when nothing was expected."""
    expected = received + lost
    return 0.0 if expected <= 0 else min(1.0, max(0.0, lost / expected))
