"""One call's audio on pjsua2's conference bridge: the tone, echo, recorder and player
connected to it, and its RTP figures. (probes.media analyses the audio afterwards.)

No Python ``AudioMediaPort``: received audio goes to pjmedia's own WAV recorder (a
Python port destroyed by refcounting races the media thread). Every media object is
dropped explicitly, at DISCONNECTED at the latest."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pjsua2 as pj

from probes.media import DTMF_OFF, DTMF_ON
from probes.sip.values import RtpStats

CLOCK_RATE: Final = 8000  # conference bridge and recorder rate: G.711 needs no more


@dataclass(slots=True)
class MediaWish:
    tone_hz: float | None = None
    echo: bool = False
    record: Path | None = None
    play: Path | None = None
    digits: str | None = None  # in-band DTMF played once (our tone is off meanwhile)

    @property
    def tone_paused(self) -> bool:
        """Something else is sent instead of our tone: a file, or DTMF digits."""
        return self.play is not None or self.digits is not None


class CallMedia:
    """What one call's audio is connected to, brought in line with ``want``."""

    def __init__(self) -> None:
        self.want = MediaWish()
        self.active = False
        self.port_id: int | None = None  # the call's conference slot the connections below are on
        self.tone: Any = None
        self.tone_hz: float | None = None
        self.echoing = False
        self.recorder: Any = None
        self.recording: Path | None = None
        self.player: Any = None
        self.playing: Path | None = None
        self.digit_tones: Any = None
        self.digits: str | None = None

    def apply(self, am: Any) -> None:
        """Bring the bridge connections of the call's audio ``am`` in line with ``want``."""
        port = am.getPortId()
        if self.port_id is not None and port != self.port_id:
            self._reconnect(am)
        self.port_id = port
        self._sync_tone(am)
        self._sync_echo(am)
        self._sync_recorder(am)
        self._sync_player(am)
        self._sync_digits(am)

    def _reconnect(self, am: Any) -> None:
        # a re-INVITE or an answer SDP differing from early media restarted the stream on
        # a new conference slot: every bridge connection was dropped with the old one
        if self.tone is not None:
            self.tone.startTransmit(am)
        if self.echoing:
            am.startTransmit(am)
        if self.recorder is not None:
            am.startTransmit(self.recorder)
        if self.player is not None:
            self.player.startTransmit(am)
        if self.digit_tones is not None:
            self.digit_tones.startTransmit(am)

    def _sync_tone(self, am: Any) -> None:
        want = self.want
        if self.tone_hz == want.tone_hz and (not want.tone_paused or self.tone is None):
            return
        self._drop_tone(am)
        if want.tone_hz is None or want.tone_paused:
            return
        tone = pj.ToneGenerator()
        tone.createToneGenerator(CLOCK_RATE, 1)
        desc = pj.ToneDesc()
        desc.freq1 = round(want.tone_hz)
        desc.freq2 = 0
        desc.on_msec = 30000
        desc.off_msec = 0
        desc.volume = 0  # pjmedia's default level, about -8 dBFS
        tones = pj.ToneDescVector()
        tones.append(desc)
        tone.play(tones, True)
        tone.startTransmit(am)
        self.tone, self.tone_hz = tone, want.tone_hz

    def _sync_echo(self, am: Any) -> None:
        if self.echoing != self.want.echo:
            if self.want.echo:
                am.startTransmit(am)
            else:
                am.stopTransmit(am)
            self.echoing = self.want.echo

    def _sync_recorder(self, am: Any) -> None:
        if self.recording != self.want.record:
            self._drop_recorder(am)
            if self.want.record is not None:
                recorder = pj.AudioMediaRecorder()
                recorder.createRecorder(str(self.want.record))
                am.startTransmit(recorder)
                self.recorder, self.recording = recorder, self.want.record

    def _sync_player(self, am: Any) -> None:
        if self.playing != self.want.play:
            self._drop_player(am)
            if self.want.play is not None:
                player = pj.AudioMediaPlayer()
                player.createPlayer(str(self.want.play), pj.PJMEDIA_FILE_NO_LOOP)
                player.startTransmit(am)
                self.player, self.playing = player, self.want.play

    def _sync_digits(self, am: Any) -> None:
        if self.digits != self.want.digits:
            self._drop_digits(am)
            if self.want.digits is not None:
                gen = pj.ToneGenerator()
                gen.createToneGenerator(CLOCK_RATE, 1)
                keys = pj.ToneDigitVector()
                for digit in self.want.digits:
                    key = pj.ToneDigit()
                    key.digit = digit
                    key.on_msec = round(DTMF_ON * 1000)
                    key.off_msec = round(DTMF_OFF * 1000)
                    key.volume = 0  # pjmedia's default level
                    keys.append(key)
                gen.playDigits(keys, False)
                gen.startTransmit(am)
                self.digit_tones, self.digits = gen, self.want.digits

    def _drop_digits(self, am: Any) -> None:
        if self.digit_tones is not None:
            if am is not None:
                with contextlib.suppress(pj.Error):
                    self.digit_tones.stopTransmit(am)
            self.digit_tones = None
        self.digits = None

    def _drop_tone(self, am: Any) -> None:
        if self.tone is not None:
            if am is not None:
                with contextlib.suppress(pj.Error):
                    self.tone.stopTransmit(am)
            self.tone = None  # the C++ destructor removes it from the bridge
        self.tone_hz = None

    def _drop_recorder(self, am: Any) -> None:
        if self.recorder is not None:
            if am is not None:
                with contextlib.suppress(pj.Error):
                    am.stopTransmit(self.recorder)
            self.recorder = None  # destructor closes the WAV file (header written)
        self.recording = None

    def _drop_player(self, am: Any) -> None:
        if self.player is not None:
            if am is not None:
                with contextlib.suppress(pj.Error):
                    self.player.stopTransmit(am)
            self.player = None
        self.playing = None

    def drop(self) -> None:
        """Destroy every media object of this call (at DISCONNECTED and shutdown)."""
        self._drop_tone(None)
        self._drop_recorder(None)
        self._drop_player(None)
        self._drop_digits(None)
        self.echoing = False


def audio_index(call: Any) -> int | None:
    """The index of the call's active audio stream, if any."""
    info = call.getInfo()  # keep the owner alive: .media points into it (SWIG)
    for m in info.media:
        if m.type == pj.PJMEDIA_TYPE_AUDIO and m.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
            return int(m.index)
    return None


def rtp_stats(call: Any) -> RtpStats | None:
    index = audio_index(call)
    if index is None:
        return None
    try:
        stat = call.getStreamStat(index)
        info = call.getStreamInfo(index)
    except pj.Error:
        return None
    rtcp = stat.rtcp
    rx, tx = rtcp.rxStat, rtcp.txStat
    rtt = rtcp.rttUsec
    return RtpStats(
        rx_packets=int(rx.pkt),
        rx_lost=int(rx.loss),
        jitter_ms=float(rx.jitterUsec.mean) / 1000.0 if int(rx.jitterUsec.n) > 0 else 0.0,
        tx_packets=int(tx.pkt),
        rtt_ms=float(rtt.mean) / 1000.0 if int(rtt.n) > 0 else None,
        codec=str(getattr(info, "codecName", "") or "PCMU"),
    )
