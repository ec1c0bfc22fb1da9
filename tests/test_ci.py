"""``.ci/run`` stops, saying why, when it cannot install what the suite needs: a green CI without the
real-Slurm tests would be a false pass."""
import os
import subprocess
from pathlib import Path

CI = Path(__file__).resolve().parent.parent / ".ci" / "run"


def _fake_bin(tmp_path, uid: str, apt_rc: int) -> str:
    """A PATH where slurmctld/munged are absent (they live in /usr/sbin), ``id -u`` prints ``uid`` and
    ``apt-get`` exits ``apt_rc``; pip is a stub that records it was called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"id": f"echo {uid}", "apt-get": f"exit {apt_rc}",
                       "pip": f"touch {tmp_path}/pip-ran"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def _run(tmp_path, uid, apt_rc):
    env = {**os.environ, "PATH": _fake_bin(tmp_path, uid, apt_rc)}
    return subprocess.run(["bash", str(CI)], env=env, capture_output=True, text=True, timeout=60)


def test_ci_fails_naming_slurm_when_apt_cannot_install_it(tmp_path):
    r = _run(tmp_path, "0", apt_rc=100)
    assert r.returncode != 0
    assert "could not install slurm-wlm and munge" in r.stderr
    assert not (tmp_path / "pip-ran").exists(), "the suite must not start without the packages"


def test_ci_fails_saying_root_is_needed_when_not_root(tmp_path):
    r = _run(tmp_path, "1000", apt_rc=0)
    assert r.returncode != 0
    assert "needs root" in r.stderr
    assert not (tmp_path / "pip-ran").exists()
