"""benchmarks/bench_step.py's back-to-back comparison with an external reference (e.g. the official code in its
own environment): the command's RESULT is parsed, ratios are candidate / reference per round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"

FAKE = '''
import argparse, json
parser = argparse.ArgumentParser()
parser.add_argument("seconds", type=float)
parser.add_argument("memory", type=float)
for flag in ("--frames", "--latent", "--threads", "--repeats", "--warmup"):
    parser.add_argument(flag, type=int, required=True)
args = parser.parse_args()
print("noise on stdout")
print("RESULT " + json.dumps({"median_seconds": args.seconds, "peak_rss_mb": args.memory,
                              "tflop_per_step": 1.0, "achieved_tflops": 1.0 / args.seconds, "frames": args.frames}))
'''


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "fake_step.py"
    fake.write_text(FAKE)
    return subprocess.run([sys.executable, str(BENCH), "--threads", "1", "--frames", "3", *args],
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)


def test_external_reference_is_measured_back_to_back(tmp_path: Path) -> None:
    fake = f"{sys.executable} {tmp_path / 'fake_step.py'}"
    done = _run(tmp_path, "--external", f"slow={fake} 4.0 1000", "--external", f"fast={fake} 1.0 250",
                "--reference", "slow", "--candidate", "fast", "--rounds", "2", "--allocator", "lean")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1][len("RESULT "):])
    fast = result["paths"]["fast"]
    assert fast["time_ratio"]["median"] == 0.25 and fast["memory_ratio"]["median"] == 0.25
    assert [m[0]["frames"] for m in result["measurements"]] == [3, 3]  # the shared flags reach the command
    assert fast["fraction_of_gemm_peak"]["median"] > 0


def test_bad_external_definitions_are_refused_with_the_fix(tmp_path: Path) -> None:
    done = _run(tmp_path, "--external", "no-command", "--reference", "no-command", "--candidate", "exact")
    assert done.returncode != 0 and "NAME=COMMAND" in done.stderr
    done = _run(tmp_path, "--external", "exact=python x.py", "--reference", "exact", "--candidate", "exact")
    assert done.returncode != 0 and "built-in modes" in done.stderr
    done = _run(tmp_path, "--reference", "oficial", "--candidate", "exact")
    assert done.returncode != 0 and "--external NAME=COMMAND" in done.stderr
    quiet = f"{sys.executable} -c pass"
    done = _run(tmp_path, "--external", f"silent={quiet}", "--reference", "silent", "--candidate", "silent",
                "--rounds", "1")
    assert done.returncode != 0 and "no RESULT" in done.stderr
    failing = f"{sys.executable} -c 'raise SystemExit(3)'"
    done = _run(tmp_path, "--external", f"broken={failing}", "--reference", "broken", "--candidate", "broken",
                "--rounds", "1")
    assert done.returncode != 0 and "exit status 3" in done.stderr and "Traceback" not in done.stderr
