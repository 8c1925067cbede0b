"""Issue 13, item 10: a default run (no ``WANDB_MODE``, no API key, no flag) never touches the network.

The run executes in a child process, so that whatever a library does in background threads or at exit is
seen too. An audit hook there records and refuses every name lookup and every connection to an IP address
(local Unix sockets, which wandb uses to talk to its own service process, stay allowed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import socket
import sys

LOG = sys.argv[1]
LOOKUPS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"}


def refuse(event, args):
    network = event in LOOKUPS or (event in ("socket.connect", "socket.sendto") and not isinstance(args[1], str))
    if network:
        with open(LOG, "a", encoding="utf-8") as fh:
            fh.write(f"{event} {args[1:]!r}\n")
        raise OSError(f"network access refused by the test: {event}")


sys.addaudithook(refuse)
from experiments.run import cli

sys.exit(cli(sys.argv[2:]))
"""


def test_a_default_run_never_touches_the_network(tmp_path) -> None:
    log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))   # HOME: no ~/.netrc key
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(log), "--task", "critic", "--smoke", "--out", str(tmp_path / "out"),
         "--set", "log.progress=False", "--set", "eval.max_images=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not log.exists(), f"a default run touched the network:\n{log.read_text()}"
    assert list((tmp_path / "out").glob("critic/*/wandb")), "the default (offline) wandb run was not created"
