"""An empty key passphrase file (a credential written as an empty line) stopped the daemon
with a ValueError traceback from crypto.NexoKey, raised inside Bridge.__init__, instead of
the clear stop the other unreadable passphrase files get (test_app_keys): it names the
terminal and the file, and what to do."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bridge.daemon.app import load_key

from .rig import python_env
from .test_app_keys import terminal


@pytest.mark.parametrize("content", ["", "\n", "\r\n"])
def test_an_empty_passphrase_file_stops_with_a_clear_message(tmp_path, content):
    secret = tmp_path / "pass"
    secret.write_text(content, newline="")
    with pytest.raises(SystemExit, match="V400m-1") as stopped:
        load_key(terminal(str(secret)))
    assert f"key passphrase file {secret} is empty" in stopped.value.code


def test_the_daemon_stops_without_a_traceback(tmp_path):
    secret = tmp_path / "pass"
    secret.write_text("\n")
    config = tmp_path / "poi-bridge.toml"
    config.write_text(f'journal = "{tmp_path}/journal.sqlite3"\n[mqtt]\nhost = "127.0.0.1"\n'
                      'port = 1\n[[terminals]]\npoi_id = "V400m-1"\n'
                      '[terminals.link]\nkind = "tcp"\nhost = "192.0.2.1"\nport = 8443\n'
                      '[terminals.key]\nidentifier = "K"\nversion = 2\n'
                      f'passphrase_file = "{secret}"\n')
    done = subprocess.run([sys.executable, "-m", "bridge", "run", "--config", str(config)],
                          capture_output=True, text=True, env=python_env(), timeout=60)
    said = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in said, said
    assert f"terminal V400m-1: key passphrase file {secret} is empty" in said, said
