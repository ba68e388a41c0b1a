"""kdlora_serve/vllm_patches.py: the one table of vLLM methods kdlora replaces, its version gate and its undo."""

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from kdlora_serve import vllm_patches  # noqa: E402
from kdlora_serve.worker import lora_cpu, lora_slots  # noqa: E402


def test_install_is_version_guarded_and_undone_by_uninstall(monkeypatch):
    """One gate for every patch: an untested vLLM or KDLORA_RANK_AWARE=0 leaves vLLM's punica wrapper (and, untested,
    every method) as it is; installed, vLLM's platform builds kdlora's subclass; uninstall restores vLLM's own."""
    import vllm
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_selector import get_punica_wrapper

    def built() -> type:
        return type(get_punica_wrapper(64, 8, "cpu", lora_config=SimpleNamespace(max_loras=2)))

    installed_before = vllm_patches.backend()  # vLLM loads the plugin in-process too (e.g. tests running vllm.LLM)
    vllm_patches.uninstall()
    stock_activate = LoRAModelManager.activate_adapter
    try:
        monkeypatch.setattr(vllm, "__version__", "0.99.0")
        assert vllm_patches.install() is None and built() is PunicaWrapperCPU
        assert LoRAModelManager.activate_adapter is stock_activate and not vllm_patches._ORIGINALS
        monkeypatch.setattr(vllm, "__version__", "0.32.0")
        monkeypatch.setenv("KDLORA_RANK_AWARE", "0")
        assert vllm_patches.install() is None and built() is PunicaWrapperCPU
        assert LoRAModelManager.activate_adapter is stock_activate  # the API-side rows only
        monkeypatch.delenv("KDLORA_RANK_AWARE")
        vllm_patches.uninstall()
        assert vllm_patches.install() == "cpu" and built() is lora_cpu.RankAwarePunicaCPU
        assert LoRAModelManager.activate_adapter is lora_slots.activate_adapter
        assert (
            vllm_patches.install() == "cpu"
            and vllm_patches.original(  # idempotent: the original kept is vLLM's
                "vllm.lora.model_manager.LoRAModelManager.activate_adapter"
            )
            is stock_activate
        )
        assert vllm_patches.rank_aware(SimpleNamespace(fully_sharded_loras=True))  # the CPU path takes those too
    finally:
        vllm_patches.uninstall()
        undone = built() is PunicaWrapperCPU and LoRAModelManager.activate_adapter is stock_activate
        if installed_before:
            vllm_patches.install()  # as the rest of this process had it
    assert undone


def test_every_patch_target_and_replacement_exists():
    """The table names real vLLM methods and real kdlora functions (a renamed method fails here, not in a server)."""
    for rows in vllm_patches.PATCHES.values():
        for patch in rows:
            if ".cuda." in patch.target:
                continue  # vllm.platforms.cuda imports CUDA-only pieces: checked on the CUDA tier
            owner, name = vllm_patches._resolve(patch.target)
            holder, function = vllm_patches._resolve(patch.replacement)
            assert hasattr(owner, name) and callable(getattr(holder, function)), patch
