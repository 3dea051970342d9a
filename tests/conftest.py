"""Shared fixtures: offline mode, a tiny model built once per session, small recipes."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-initialised tiny Qwen2 + character tokenizer as an HF directory."""
    from rltk.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


# correctness of the 16 completions (4 prompts × 4) of the 2-process PACED step tests: pass rates
# 0.25, 0.5, 0.75, 0, so w(p) = p(1 - p) differs by prompt and Σw differs by rank
PACED_CORRECT = "[1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]"


def small_recipe_data(model_dir: str, output_dir, **sections) -> dict:
    """A recipe small enough for a few-second RL run of the tiny model."""
    data = {
        "model": {"name_or_path": model_dir},
        "data": {"source": "builtin", "levels": [1], "template": "compact", "num_train": 64, "num_test": 8},
        "rollout": {"group_size": 4, "max_new_tokens": 8, "temperature": 1.0},
        "trainer": {"steps": 2, "prompts_per_step": 4, "micro_batch_size": 8, "lr": 1e-3,
                    "output_dir": str(output_dir), "seed": 0},
        "eval": {"n": 2, "temperature": 1.0, "top_p": 1.0, "maj": False},
        "verifier": {"deadline_s": 3.0, "num_workers": 1},
        "logging": {"progress": False},
        # math (correctness, usually 0 for a random model) + a dense reward so advantages are non-zero
        "rewards": [{"name": "math"}, {"name": "tests.user_stages:digit_share_reward"}],
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values) if isinstance(values, dict) else data.__setitem__(section, values)
    return data


# ---------------------------------------------------------------- multi-process launches
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TIMEOUT_S = 600  # one 2-process run; first-use compiles happen before it (build_deepspeed_ops)


def free_port() -> int:
    """A TCP port free on every interface right now (bound to port 0, then released), for one
    2-process run's rendezvous. Fixed numbers collide with each other (two files once used 29531)
    and with a stale process of an earlier run."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def stderr_report(stderr: str, limit: int = 5000) -> str:
    """A failed run's stderr for an assertion message: its error lines first (a rank's one-line
    ``rltk: error`` or exception is otherwise buried under the launcher's summary), then its end."""
    import re

    errors = dict.fromkeys(line.strip() for line in stderr.splitlines()
                           if re.search(r"Error|error:|Traceback|rltk: |Killed|Timeout", line))
    head = "\n".join(errors)[-3000:]
    return f"--- error lines ---\n{head}\n--- stderr (end) ---\n{stderr[-limit:]}"


def run_command(cmd: list[str], env: dict, timeout: float = LAUNCH_TIMEOUT_S, cwd: str = ROOT):
    """Run ``cmd`` in its own process group and return the ``CompletedProcess``. On a timeout the
    whole group is killed (a launcher's workers too, so none lingers holding a port) and the test
    fails with the command's stderr."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout:.0f} s: {' '.join(map(str, cmd))}\n{stderr_report(err)}\n"
                    f"--- stdout (end) ---\n{out[-2000:]}", pytrace=False)
    finally:
        try:  # workers left behind by a launcher that failed
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch_with_free_port(make, timeout: float = LAUNCH_TIMEOUT_S, attempts: int = 3):
    """Run the command ``make(port) -> (cmd, env)`` builds for a free port; asserts exit status 0
    and shows the stderr otherwise. A rendezvous that lost its port to another process between the check and
    the bind ("address already in use") is retried on a new port."""
    for attempt in range(attempts):
        cmd, env = make(free_port())
        proc = run_command(cmd, env, timeout)
        lost_port = "address already in use" in proc.stderr.lower() or "eaddrinuse" in proc.stderr.lower()
        if proc.returncode == 0 or not lost_port or attempt == attempts - 1:
            break
    assert proc.returncode == 0, (f"exit status {proc.returncode}: {' '.join(map(str, cmd))}\n"
                                  f"{stderr_report(proc.stderr)}")
    return proc


_DEEPSPEED_OPS_BUILT = False
DEEPSPEED_BUILD_TIMEOUT_S = 1800
_BUILD_DEEPSPEED_OPS = """
import deepspeed.ops
from deepspeed.accelerator import get_accelerator

for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):  # every CPU run's comm op; ZeRO offload's Adam
    builder = get_accelerator().create_op_builder(name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print("not needed:", name)
        continue
    builder.load()
    print("ready:", builder.NAME)
"""


def build_deepspeed_ops() -> None:
    """Compile DeepSpeed's CPU ops (the shared-memory comm op every DeepSpeed process loads on CPU,
    and CPU Adam for ZeRO offload) once per session, in one process with its own long timeout,
    before any timed 2-process run: on a fresh machine the first compile takes minutes, and two
    ranks doing it inside a test's timeout made a resume test fail once. A no-op (seconds) when
    the ops are already in the torch extensions cache."""
    global _DEEPSPEED_OPS_BUILT
    if _DEEPSPEED_OPS_BUILT:
        return
    import sys

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = run_command([sys.executable, "-c", _BUILD_DEEPSPEED_OPS], env, timeout=DEEPSPEED_BUILD_TIMEOUT_S)
    assert proc.returncode == 0, f"building DeepSpeed's CPU ops failed:\n{stderr_report(proc.stderr)}"
    _DEEPSPEED_OPS_BUILT = True


@pytest.fixture(scope="session")
def deepspeed_ops():
    """DeepSpeed's CPU ops compiled (first use) before the test's timed subprocesses start."""
    build_deepspeed_ops()
