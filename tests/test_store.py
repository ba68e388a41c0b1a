"""The server's adapter store: what it keeps on disk."""

import os
import subprocess
import sys

from kdlora_serve.api.store import ENV_ADAPTERS, AdapterStore


def test_adapter_copies_of_dead_servers_are_removed_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLORA_CACHE", str(tmp_path))
    monkeypatch.setenv(ENV_ADAPTERS, "{}")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead = tmp_path / "served" / f"org--adapter-{gone.stdout.strip()}" / "full"
    live = tmp_path / "served" / f"org--adapter-{os.getpid()}" / "full"
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    AdapterStore.from_env()
    assert not dead.parent.exists()
    assert (live / "adapter_model.safetensors").exists()  # a running server's copy is never touched


def test_a_server_that_exits_removes_its_adapter_copies(tmp_path):
    from conftest import tiny_llama, write_nested_adapter

    adapter = write_nested_adapter(tmp_path / "adapter", tiny_llama(), rank=4)
    probe = (
        "from pathlib import Path\n"
        "from kdlora_serve.api.store import AdapterStore\n"
        f"store = AdapterStore({{'a': {str(adapter)!r}}}, [], [], Path({str(tmp_path / 'served')!r}))\n"
        "print(store.lora_dir('a', 2))\n"
    )
    made = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert made.endswith("/r2") and (tmp_path / "served").is_dir()
    assert list((tmp_path / "served").iterdir()) == []
