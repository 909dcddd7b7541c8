"""probes.media: Goertzel tone detection, the E-model MOS, RTP figures, WAV files."""

from __future__ import annotations

import math
import random
import wave
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes import media
from probes.checks import ANNOUNCEMENT

RATE = 8000


def detect(samples: list[int], *freqs: float) -> dict[float, media.ToneReport]:
    return media.detect_tones(samples, RATE, list(freqs))


def mix(*signals: list[int]) -> list[int]:
    return [max(-32768, min(32767, sum(v))) for v in zip(*signals, strict=True)]


# -------------------------------------------------------------------- Goertzel


def test_goertzel_gives_the_frame_energy_for_a_pure_tone() -> None:
    frame = media.tone(1000, RATE, 0.02)
    energy = sum(float(v) * v for v in frame)
    assert media.goertzel_power(frame, 1000, RATE) == pytest.approx(energy, rel=0.01)
    assert media.goertzel_power(frame, 1400, RATE) < energy * 1e-4
    assert media.goertzel_power([], 1000, RATE) == 0.0


def test_1000_and_1400_are_told_apart() -> None:
    a, b = media.tone(1000, RATE, 1.0), media.tone(1400, RATE, 1.0)
    only_a = detect(a, 1000, 1400)
    assert only_a[1000].heard and not only_a[1400].heard
    assert only_a[1400].frames == 0  # not even one frame of false detection
    only_b = detect(b, 1000, 1400)
    assert only_b[1400].heard and not only_b[1000].heard and only_b[1000].frames == 0
    both = detect(mix(a, b), 1000, 1400)
    assert both[1000].heard and both[1400].heard
    assert both[1000].first_at == 0.0 and both[1000].longest_run == pytest.approx(1.0)


@pytest.mark.parametrize("other", [1600.0, 1200.0, 1800.0, 900.0, 1450.0])
def test_no_false_detection_of_a_different_frequency(other: float) -> None:
    heard = detect(media.tone(other, RATE, 1.0), 1000, 1400)
    assert not heard[1000].heard and not heard[1400].heard


def test_a_quieter_echo_is_still_heard_next_to_the_responder_tone() -> None:
    tone = media.tone(1400, RATE, 1.0, dbfs=-9)
    echo = media.tone(1000, RATE, 1.0, dbfs=-29)  # 20 dB down
    heard = detect(mix(tone, echo), 1000, 1400)
    assert heard[1000].heard and heard[1400].heard
    too_quiet = detect(mix(tone, media.tone(1000, RATE, 1.0, dbfs=-40)), 1000, 1400)
    assert not too_quiet[1000].heard  # 31 dB down: below min_share


def test_an_unexpected_tone_does_not_mask_the_expected_one() -> None:
    heard = detect(mix(media.tone(1000, RATE, 1.0), media.tone(1800, RATE, 1.0)), 1000, 1400)
    assert heard[1000].heard and not heard[1400].heard


def test_noise_silence_and_short_bursts_are_not_tones() -> None:
    rng = random.Random(7)
    noise = [round(rng.gauss(0, 4000)) for _ in range(RATE)]
    assert not any(r.heard for r in detect(noise, 1000, 1400).values())
    silence = [0] * RATE
    assert not any(r.heard for r in detect(silence, 1000, 1400).values())
    faint = media.tone(1000, RATE, 1.0, dbfs=-60)  # under the -50 dBFS floor
    assert not detect(faint, 1000)[1000].heard
    burst = [0] * 4000 + media.tone(1000, RATE, 0.2) + [0] * 2400  # 200 ms < min_run 300 ms
    report = detect(burst, 1000)[1000]
    assert not report.heard and report.frames == 10


def test_tone_in_noise_and_late_start() -> None:
    rng = random.Random(3)
    late = [0] * 4000 + media.tone(1400, RATE, 0.5, dbfs=-12)
    noisy = [v + round(rng.gauss(0, 300)) for v in late]
    report = detect(noisy, 1400)[1400]
    assert report.heard
    assert report.first_at == pytest.approx(0.5, abs=0.021)


@settings(max_examples=40, deadline=None)
@given(
    freq=st.floats(min_value=300, max_value=3400),
    other=st.floats(min_value=300, max_value=3400),
    phase=st.floats(min_value=0, max_value=6.28),
)
def test_detection_property(freq: float, other: float, phase: float) -> None:
    """A tone is heard at its own frequency; a tone 300 Hz or more away never is."""
    samples = media.tone(freq, RATE, 0.6, phase=phase)
    assert detect(samples, freq)[freq].heard
    if abs(other - freq) >= 300:
        assert not detect(samples, other)[other].heard


# --------------------------------------------------------------------- E-model


def test_e_model_known_values() -> None:
    assert media.mos_from_r(93.2) == pytest.approx(4.41, abs=0.005)  # G.107 default, no impairment
    assert media.mos_from_r(0) == 1.0 and media.mos_from_r(-5) == 1.0
    assert media.mos_from_r(100) == 4.5 and media.mos_from_r(120) == 4.5
    assert media.mos_from_r(50) == pytest.approx(2.58, abs=0.005)
    assert media.delay_impairment(100) == pytest.approx(2.4)
    assert media.delay_impairment(277.3) == pytest.approx(0.024 * 277.3 + 11.0)
    # G.711 with PLC, Bpl 25.1 (G.113 App. I): 1 % random loss costs about 3.6 R points
    assert media.effective_equipment_impairment(0.01) == pytest.approx(95 / 26.1, rel=1e-6)
    assert media.r_factor(one_way_delay_ms=0, loss=0) == pytest.approx(93.2)


def test_clean_loopback_call_scores_about_4_4() -> None:
    mos = media.estimate_mos(loss=0.0, jitter_ms=0.2, rtt_ms=None)
    assert 4.35 <= mos <= 4.41


def test_mos_never_below_one_for_small_positive_r() -> None:
    # found by hypothesis in CI: G.107's polynomial gives 0.99 at R around 5
    assert all(media.mos_from_r(r / 10) >= 1.0 for r in range(0, 1000))
    assert media.estimate_mos(loss=0.09375, jitter_ms=98.0, rtt_ms=741.0) == 1.0


@settings(max_examples=60, deadline=None)
@given(
    loss=st.floats(min_value=0, max_value=0.5),
    more_loss=st.floats(min_value=0.001, max_value=0.5),
    jitter=st.floats(min_value=0, max_value=100),
    rtt=st.floats(min_value=0, max_value=1000),
    more_rtt=st.floats(min_value=1, max_value=500),
)
def test_mos_is_monotonic(loss: float, more_loss: float, jitter: float, rtt: float, more_rtt: float) -> None:
    base = media.estimate_mos(loss=loss, jitter_ms=jitter, rtt_ms=rtt)
    assert 1.0 <= base <= 4.5
    assert media.estimate_mos(loss=min(1.0, loss + more_loss), jitter_ms=jitter, rtt_ms=rtt) <= base
    assert media.estimate_mos(loss=loss, jitter_ms=jitter + 10, rtt_ms=rtt) <= base
    assert media.estimate_mos(loss=loss, jitter_ms=jitter, rtt_ms=rtt + more_rtt) <= base


def test_heavy_loss_is_poor() -> None:
    assert media.estimate_mos(loss=0.2, jitter_ms=5, rtt_ms=100) < 3.0
    assert media.estimate_mos(loss=1.0, jitter_ms=0, rtt_ms=None) < 1.5


def test_loss_fraction() -> None:
    assert media.loss_fraction(0, 0) == 0.0
    assert media.loss_fraction(98, 2) == pytest.approx(0.02)
    assert media.loss_fraction(0, 10) == 1.0


# --------------------------------------------------------------------- files


def test_wav_round_trip_and_completeness(tmp_path: Path) -> None:
    path = tmp_path / "t.wav"
    samples = media.tone(1400, RATE, 0.5)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(b"".join(v.to_bytes(2, "little", signed=True) for v in samples))
    got, rate = media.read_wav(path)
    assert rate == RATE and list(got) == samples
    assert media.wav_complete(path)
    assert media.wav_duration(path) == pytest.approx(0.5)
    partial = tmp_path / "partial.wav"
    partial.write_bytes(path.read_bytes()[:4] + b"\0\0\0\0" + path.read_bytes()[8:])  # sizes not yet written
    assert not media.wav_complete(partial)
    assert not media.wav_complete(tmp_path / "missing.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not a wav")
    with pytest.raises(ValueError):
        media.read_wav(junk)


def test_the_shipped_announcement() -> None:
    """8 kHz mono 16-bit, a few seconds, speech (not silence, not a test tone)."""
    with wave.open(str(ANNOUNCEMENT), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
    length = media.wav_duration(ANNOUNCEMENT)
    assert 2.5 < length < 5.0
    assert ANNOUNCEMENT.stat().st_size < 100_000
    samples, rate = media.read_wav(ANNOUNCEMENT)
    loud = sum(1 for v in samples if abs(v) > 3000)
    assert loud > len(samples) // 20
    heard = media.detect_tones(samples, rate, [1000, 1400])
    assert not heard[1000].heard and not heard[1400].heard  # speech is not mistaken for a tone


# ------------------------------------------------------------------ in-band DTMF


def dtmf(samples: list[int], **kw: object) -> str:
    return "".join(d.digit for d in media.detect_dtmf(samples, RATE, **kw))  # type: ignore[arg-type]


def test_every_dtmf_key_and_repeats() -> None:
    assert dtmf(media.dtmf_tones("0123456789*#ABCD", RATE)) == "0123456789*#ABCD"
    assert dtmf(media.dtmf_tones("1155", RATE, on=0.05, off=0.05)) == "1155"


def test_dtmf_duration_and_gap_limits() -> None:
    for offset in range(0, 80, 5):
        assert dtmf([0] * offset + media.dtmf_tones("5", RATE, on=0.02)) == ""
        assert dtmf([0] * offset + media.dtmf_tones("5", RATE, on=0.04)) == "5"
        assert dtmf([0] * offset + media.dtmf_tones("55", RATE, off=0.01)) == "5"  # a dropout
        assert dtmf([0] * offset + media.dtmf_tones("55", RATE, off=0.04)) == "55"


def test_dtmf_twist_limits() -> None:
    assert dtmf(media.dtmf_tones("159", RATE, twist_db=7)) == "159"
    assert dtmf(media.dtmf_tones("159", RATE, twist_db=-3)) == "159"
    assert dtmf(media.dtmf_tones("159", RATE, twist_db=9)) == ""
    assert dtmf(media.dtmf_tones("159", RATE, twist_db=-5)) == ""


def test_dtmf_in_noise_next_to_the_responder_tone_and_not_in_speech() -> None:
    rng = random.Random(1)
    keys = "0123456789*#ABCD"
    digits = media.dtmf_tones(keys, RATE, dbfs=-14.5)
    noise = [round(rng.gauss(0, 3000)) for _ in digits]
    assert dtmf(mix(digits, noise)) == keys
    assert dtmf(noise) == ""
    responder = media.tone(1400, RATE, len(digits) / RATE, dbfs=-8.5)[: len(digits)]
    assert dtmf(responder) == "" and dtmf(media.tone(1000, RATE, 1.0)) == ""
    assert dtmf(mix(digits, responder), ignore=(1400.0, 1000.0)) == keys
    assert dtmf(mix(digits, responder)) == ""  # not removed, the responder's tone masks them
    for f0 in (100, 120, 140, 175, 233):  # harmonic-rich, speech-like
        voice = [
            round(
                sum(
                    3000 / k * math.sin(2 * math.pi * f0 * k * i / RATE)
                    for k in range(1, 25)
                    if f0 * k < 3800
                )
            )
            for i in range(RATE)
        ]
        assert dtmf(voice) == ""
