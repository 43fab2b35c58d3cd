"""Videos and other formats libsndfile cannot read, decoded by ffmpeg: equal to librosa.load,
streamed in blocks, clear errors, and no ffmpeg process left behind. The media are made here
with ffmpeg (a 64x48 test pattern at 5 fps, tones or noise)."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import soundfile as sf

import soundnet_io
from conftest import ROOT, tone
from soundnet import AudioError, load_audio, open_audio, tile_clip

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None,
                                reason="ffmpeg is not installed (.ci/run installs it)")

VIDEO = ["-f", "lavfi", "-i", "testsrc=size=64x48:rate=5"]
STEREO = "0.4*sin(2*PI*330*t)|0.3*sin(2*PI*550*t)+0.2*sin(2*PI*37*t)"
SURROUND = "|".join(f"0.3*sin(2*PI*{110 * (c + 2)}*t)" for c in range(6)) + ":c=5.1"
# name: (ffmpeg arguments after the inputs, audio source, sample rate, channels, with video)
MEDIA = {
    "clip.mp4": (["-c:v", "mpeg4", "-c:a", "aac"], STEREO, 44100, 2, True),
    "clip.webm": (["-c:v", "libvpx", "-c:a", "libopus"], STEREO, 48000, 2, True),
    "clip.mkv": (["-c:v", "mpeg4", "-c:a", "libvorbis"], "noise", 32000, 1, True),
    "clip.m4a": (["-c:a", "aac"], SURROUND, 48000, 6, False),
    "clip.avi": (["-c:v", "mjpeg", "-c:a", "pcm_s16le"], "noise", 16000, 1, True),
}


def audio_source(kind, rate, seconds):
    if kind == "noise":
        return f"anoisesrc=sample_rate={rate}:amplitude=0.3:seed=7:duration={seconds}"
    return f"aevalsrc={kind}:s={rate}:d={seconds}"


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *map(str, args)], check=True)


def make_media(path, seconds=3.0, name=None):
    """One of MEDIA (by `path`'s name, or `name`), `seconds` long."""
    codecs, kind, rate, _, video = MEDIA[name or path.name]
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg(*(VIDEO if video else []), "-f", "lavfi", "-i", audio_source(kind, rate, seconds),
           "-t", seconds, *codecs, path)
    return path


def librosa_load(path):
    import librosa
    with warnings.catch_warnings():   # "PySoundFile failed. Trying audioread instead."
        warnings.simplefilter("ignore")
        return librosa.load(path, sr=22050)[0]


def assert_equal_audio(got, want):
    assert got.dtype == np.float32 and len(got) == len(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def ffmpeg_processes(marker: str) -> list:
    """Running ffmpeg processes whose command line contains `marker` (Linux /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(args[0]) == b"ffmpeg" and marker.encode() in b" ".join(args):
            found.append(int(pid))
    return found


def cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "extract_feats.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def manifest(out):
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


# -- decoding --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MEDIA)
def test_formats_equal_librosa_load(tmp_path, name):
    path = make_media(tmp_path / name)
    _, _, rate, channels, _ = MEDIA[name]
    info, blocks = open_audio(path)
    assert (info.sample_rate, info.channels) == (rate, channels)
    assert_equal_audio(np.concatenate(list(blocks)), librosa_load(path))
    assert_equal_audio(load_audio(path), librosa_load(path))
    assert not ffmpeg_processes(str(tmp_path))


def test_channel_first_takes_the_first_channel(tmp_path):
    path = make_media(tmp_path / "clip.mp4")
    left = tmp_path / "left.wav"
    ffmpeg("-i", path, "-map", "0:a:0", "-af", "pan=mono|c0=c0", "-c:a", "pcm_s16le", left)
    assert_equal_audio(load_audio(path, channel="first"), librosa_load(left))


def test_long_input_streams_in_blocks_equal_to_whole(tmp_path):
    path = make_media(tmp_path / "long.m4a", seconds=60, name="clip.mp4")   # AAC, no video
    info, blocks = open_audio(path, block_seconds=2.0)
    blocks = list(blocks)
    assert len(blocks) >= 29 and max(map(len, blocks)) < 2.1 * 22050
    assert_equal_audio(np.concatenate(blocks), librosa_load(path))


def test_several_audio_streams_take_the_first(tmp_path):
    first = make_media(tmp_path / "first.mkv", name="clip.mkv")       # mono 32 kHz
    second = make_media(tmp_path / "second.webm", name="clip.webm")   # stereo 48 kHz
    both = tmp_path / "both.mkv"
    ffmpeg("-i", first, "-i", second, "-map", "0:v", "-map", "0:a", "-map", "1:a", "-c", "copy",
           both)
    info = open_audio(both)[0]   # its blocks, never read, are dropped: ffmpeg is stopped
    assert (info.sample_rate, info.channels) == (32000, 1)   # ffmpeg alone would pick stereo
    assert not ffmpeg_processes(str(tmp_path))
    assert_equal_audio(load_audio(both), librosa_load(first))


def test_video_without_audio_and_corrupt_containers(tmp_path):
    video_only = tmp_path / "video only.mp4"
    ffmpeg(*VIDEO, "-t", 2, "-c:v", "mpeg4", video_only)
    with pytest.raises(AudioError, match="no audio stream") as error:
        load_audio(video_only)
    assert str(video_only) in str(error.value)
    good = make_media(tmp_path / "clip.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good[:len(good) // 2])   # the index (moov) is written at the end: lost
    with pytest.raises(AudioError, match="corrupt or truncated MP4"):
        load_audio(cut)
    noise = tmp_path / "noise.webm"
    noise.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(AudioError, match="not an audio file"):
        load_audio(noise)
    assert not ffmpeg_processes(str(tmp_path))


def test_missing_ffmpeg_says_how_to_install_it(tmp_path, monkeypatch):
    path = make_media(tmp_path / "clip.webm")
    monkeypatch.setattr(soundnet_io, "FFMPEG", str(tmp_path / "no-such-ffmpeg"))
    with pytest.raises(AudioError, match="ffmpeg is not installed") as error:
        load_audio(path)
    for how in ("apt-get install ffmpeg", "conda install -c conda-forge ffmpeg", "brew install"):
        assert how in str(error.value)
    sf.write(tmp_path / "tone.flac", tone(1), 22050)   # libsndfile formats need no ffmpeg
    assert len(load_audio(tmp_path / "tone.flac")) == 22050


def test_abandoned_stream_stops_ffmpeg(tmp_path):
    path = make_media(tmp_path / "long.mkv", seconds=120, name="clip.avi")
    _, blocks = open_audio(path, block_seconds=1.0)
    next(blocks)
    assert ffmpeg_processes(str(tmp_path))
    blocks.close()   # what a caller that stops early (an error downstream) does
    assert not ffmpeg_processes(str(tmp_path))


# -- extract_feats.py ------------------------------------------------------------------------------

def test_extract_feats_reads_a_folder_of_videos(tmp_path, net):
    folder = tmp_path / "videos"
    for name in MEDIA:
        make_media(folder / f"{name.replace('.', '_')}{os.path.splitext(name)[1]}", name=name)
    ffmpeg(*VIDEO, "-t", 2, "-c:v", "mpeg4", folder / "video only.mp4")
    mp4 = (folder / "clip_mp4.mp4").read_bytes()
    (folder / "cut.mp4").write_bytes(mp4[:len(mp4) // 2])
    out = tmp_path / "out"
    result = cli("-i", folder, "-o", out, "-f", ".mp4", ".mkv", ".webm", ".m4a", ".avi",
                 "--features", "conv7", "--workers", 2, "--quiet")
    assert result.returncode == 1, result.stderr
    rows = manifest(out)
    assert {k: r["status"] for k, r in rows.items()} == {
        "clip_mp4": "ok", "clip_webm": "ok", "clip_mkv": "ok", "clip_m4a": "ok", "clip_avi": "ok",
        "video only": "failed", "cut": "failed"}
    assert "no audio stream" in rows["video only"]["error"]
    assert "corrupt or truncated MP4" in rows["cut"]["error"]
    assert (rows["clip_m4a"]["sample_rate"], rows["clip_m4a"]["channels"]) == ("48000", "6")
    for name in MEDIA:
        key = name.replace(".", "_")
        wave = librosa_load(folder / f"{key}{os.path.splitext(name)[1]}")
        assert float(rows[key]["seconds"]) == pytest.approx(len(wave) / 22050, abs=1e-3)
        wave = tile_clip(wave)   # --min-seconds 20
        want = net.extract(wave, ["conv7"])["conv7"]
        got = np.load(out / "conv7" / f"{key}.npy", allow_pickle=False)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert not ffmpeg_processes(str(tmp_path))


def test_extract_feats_without_ffmpeg_explains_and_goes_on(tmp_path):
    folder = tmp_path / "in"
    make_media(folder / "clip.mp4")
    sf.write(folder / "tone.wav", tone(12), 22050)
    no_ffmpeg = tmp_path / "bin"   # a PATH where ffmpeg cannot be found
    no_ffmpeg.mkdir()
    env = {**os.environ, "PATH": str(no_ffmpeg)}
    result = cli("-i", folder, "-o", tmp_path / "out", "-f", ".mp4", ".wav", "--features", "pool5",
                 "--quiet", env=env)
    assert result.returncode == 1, result.stderr
    rows = manifest(tmp_path / "out")
    assert rows["tone"]["status"] == "ok" and rows["clip"]["status"] == "failed"
    assert "ffmpeg is not installed" in rows["clip"]["error"]
    assert "apt-get install ffmpeg" in rows["clip"]["error"]


@pytest.mark.parametrize("sig, workers", [(signal.SIGKILL, 2), (signal.SIGKILL, 0),
                                          (signal.SIGINT, 2)])
def test_killed_run_leaves_no_ffmpeg_behind(tmp_path, sig, workers):
    folder = tmp_path / "in"
    folder.mkdir()
    # 30 minutes of 8 kHz PCM in Matroska: quick to make, seconds to extract, and far more than
    # the decoders run ahead of the model
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=8000:duration=1800",
           "-c:a", "pcm_s16le", folder / "long.mkv")
    # its own session, so SIGINT to the group is what Ctrl-C in a terminal sends
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "extract_feats.py"), "-i", str(folder), "-o",
         str(tmp_path / "out"), "-f", ".mkv", "--features", "pool5", "--workers", str(workers),
         "--quiet"], cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not ffmpeg_processes(str(folder)) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)   # into the extraction loop
    assert ffmpeg_processes(str(folder)), "ffmpeg never started, or was done too soon"
    os.killpg(process.pid, sig) if sig == signal.SIGINT else os.kill(process.pid, sig)
    _, stderr = process.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert process.returncode == 130, stderr
    deadline = time.time() + 10
    while ffmpeg_processes(str(folder)) and time.time() < deadline:
        time.sleep(0.05)
    assert not ffmpeg_processes(str(folder))
