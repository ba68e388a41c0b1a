"""The server's adapter store: what it keeps on disk."""

import os
import subprocess
import sys

from kdlora_serve.store import AdapterStore, ENV_ADAPTERS


def test_adapter_copies_of_dead_servers_are_removed_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLORA_CACHE", str(tmp_path))
    monkeypatch.setenv(ENV_ADAPTERS, "{}")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead = tmp_path / "served" / f"org--adapter-{gone.stdout.strip()}" / "full"
    live = tmp_path / "served" / f"org--adapter-{os.getpid()}" / "full"
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    AdapterStore.from_env()
    assert not dead.parent.exists()
    assert (live / "adapter_model.safetensors").exists()  # a running server's copy is never touched
