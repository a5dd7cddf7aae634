"""Building the C++ extensions survives a build that was killed mid-way (its lock left behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from kernels.cpu import TORCH_BATON, build_lock

ROOT = Path(__file__).resolve().parents[2]
HANG = 600  # seconds: only a build that waits on a dead lock takes this long


def run_python(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPARSE_SERVE_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=HANG)


def test_a_build_killed_mid_way_does_not_block_the_next(tmp_path):
    source = tmp_path / "answer.cpp"
    source.write_text("#include <pybind11/pybind11.h>\n"
                      "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def(\"answer\", [] { return 42; }); }\n")
    code = f"""
        from pathlib import Path
        from kernels.cpu import build_extension, extension_dir
        (extension_dir() / "answer_ext").mkdir(parents=True)
        (extension_dir() / "answer_ext" / {TORCH_BATON!r}).touch()  # what a killed torch build leaves
        ext = build_extension("answer_ext", Path({str(source)!r}), ["-O0"])
        assert not isinstance(ext, str), ext
        print(ext.answer())
    """
    done = run_python(code, tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "42"
    assert "did not finish" in done.stderr  # the stale lock was named as it was removed


def test_the_build_lock_is_released_when_its_holder_is_killed(tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from pathlib import Path
            from kernels.cpu import build_lock
            with build_lock(Path({str(build)!r})):
                Path({str(build / "held")!r}).touch()
                time.sleep({HANG})
        """)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + HANG
        while not (build / "held").exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.05)
        (build / TORCH_BATON).touch()  # the holder's torch build, mid-way
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with build_lock(build):  # would wait forever if the lock outlived its holder
        assert not (build / TORCH_BATON).exists()
