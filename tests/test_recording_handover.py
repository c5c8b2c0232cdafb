"""A recorded call handed over (SHUTDOWN_MODE=handover) keeps every instance's audio in one
<CallSid>.wav, when both instances write to one RECORDINGS_DIR."""

from __future__ import annotations

import asyncio
import time
import wave
from pathlib import Path

from server.app import RECORDS, REGISTRY
from server.call.features.recording import stereo_pcm
from server.fleet.state import MemoryState
from server.testing.dial import TwilioStream, call_form
from server.testing.inbox import wait_until
from server.testing.standin import next_session
from tests.conftest import MakeRig
from tests.test_handover import signed_post

WAIT = 10.0
QUIET_A, QUIET_B = 0xFE, 0x7E  # mu-law for +8 and -8: audible in the file, no speech to a VAD


def channels(path: Path) -> tuple[bytes, bytes]:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 8000)
        frames = wav.readframes(wav.getnframes())
    return (b"".join(frames[i:i + 2] for i in range(0, len(frames), 4)),
            b"".join(frames[i + 2:i + 4] for i in range(0, len(frames), 4)))


def sample(ulaw: int) -> bytes:
    return stereo_pcm(bytes([ulaw]), b"")[:2]


async def test_a_handed_over_recording_holds_both_instances_audio(make_rig: MakeRig,
                                                                  tmp_path: Path) -> None:
    """3 s recorded on the first instance, 1 s on the second: about 4 s in one file (exactly
    4 s unless the handover took longer than the audio, then its gap is silence), each part
    where it was heard. Before, the second instance overwrote the file with its 1 s."""
    began = time.monotonic()
    state = MemoryState()
    await state.start()
    public = "http://fleet.example"
    old = await make_rig(state=state, shutdown_mode="handover", public_url=public,
                         record_calls=True)
    new = await make_rig(state=state, public_url=public, record_calls=True)
    assert old.settings.recordings_dir == new.settings.recordings_dir  # shared
    http = old.bridge.session
    call_sid = "CA" + "b" * 32
    final = (tmp_path / "recordings" / f"{call_sid}.wav").resolve()

    form = call_form(call_sid, "+15550001111", "+15550002222")
    twiml = await signed_post(old, public, "/incoming-call", form)
    stream = await TwilioStream.connect(http, str(old.bridge.make_url("/media-stream")))
    old.streams.append(stream)
    await stream.send_connected()
    await stream.send_start(call_sid, "MZ" + "1" * 32, twiml.parameters)
    await (await next_session(old.standin.app)).wait_for("session.update")
    (call,) = old.live_calls()
    for _ in range(150):  # 3 s
        await stream.send_media(bytes([QUIET_A]) * 160)
    await wait_until(lambda: call.record.frames_in == 150, WAIT, "3 s relayed")

    await old.app[REGISTRY].close_all(grace=WAIT)
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert call.ending is not None and call.ending.kind == "handover"
    assert call.record.recording == str(final)
    assert len(channels(final)[0]) == 2 * 3 * 8000  # the first part is in place already

    again = await signed_post(new, public, "/connect-action", {**form, "CallStatus": "in-progress"})
    resumed = await TwilioStream.connect(http, str(new.bridge.make_url("/media-stream")))
    new.streams.append(resumed)
    await resumed.send_connected()
    await resumed.send_start(call_sid, "MZ" + "2" * 32, again.parameters)
    await (await next_session(new.standin.app)).wait_for("session.update")
    (moved,) = new.live_calls()
    for _ in range(50):  # 1 s
        await resumed.send_media(bytes([QUIET_B]) * 160)
    await wait_until(lambda: moved.record.frames_in == 200, WAIT, "1 s more relayed")
    await resumed.send_stop()
    await asyncio.wait_for(resumed.closed.wait(), WAIT)
    await wait_until(lambda: not new.live_calls(), WAIT, "the call ended")
    recorder = new.app[RECORDS].recorder
    assert recorder is not None
    await recorder.wait_idle()
    elapsed = time.monotonic() - began

    assert moved.record.recording == str(final)
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]  # no parts left
    left, right = channels(final)
    gap = len(left) // 2 - 4 * 8000  # silence between the parts: none unless it took > 4 s
    assert 0 <= gap <= max(0.0, elapsed - 4) * 8000 + 1
    assert left == sample(QUIET_A) * 24000 + sample(0xFF) * gap + sample(QUIET_B) * 8000
    assert right == sample(0xFF) * (32000 + gap)  # nobody spoke: no reply
    await state.close()
