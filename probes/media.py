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
