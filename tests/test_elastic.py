"""The elastic table (kdlora_serve.elastic) as the worker uses it each step (kdlora_serve.worker.lora_slots._want):
prompt at the admitted rank, the cap from the first decode step on, every generated token counted at its rank,
nothing written for a request whose row was released."""

from types import SimpleNamespace

import numpy as np
import pytest

from kdlora_serve import elastic, rank
from kdlora_serve.worker import lora_slots


def runner_and_batch(handle: str | None, prompt: int):
    """A model runner holding one request `kd@r8` (elastic when `handle`), and vLLM's input batch of it."""
    lora = SimpleNamespace(lora_name="kd@r8", lora_path="/nonexistent", lora_int_id=1)
    params = SimpleNamespace(extra_args={elastic.XARG: handle} if handle else None)
    runner = SimpleNamespace(requests={"req-0": SimpleNamespace(lora_request=lora, sampling_params=params)})
    batch = SimpleNamespace(
        req_ids=["req-0"], num_computed_tokens_cpu=np.array([0]), num_prompt_tokens=np.array([prompt]), num_reqs=1
    )
    return runner, batch


def step(runner, batch, scheduled: int) -> int:
    """One engine step of `scheduled` tokens for the request: the rank it is computed at."""
    want = lora_slots._want(runner, batch, 0, scheduled)
    batch.num_computed_tokens_cpu[0] += scheduled
    return want // 2


def test_the_worker_computes_the_prompt_at_the_admitted_rank_then_decodes_at_the_cap_and_counts_each_token():
    table = elastic.table()
    handle = table.claim(8)
    runner, batch = runner_and_batch(handle, prompt=10)
    ranks = [step(runner, batch, 6)]  # a prompt chunk: no token kept
    table.lower(handle, 4)
    ranks += [step(runner, batch, 4)]  # the prompt's last chunk: still rank 8, its token counted at 8
    ranks += [step(runner, batch, 1) for _ in range(3)]
    table.lower(handle, 1)
    ranks += [step(runner, batch, 1) for _ in range(2)]
    assert ranks == [8, 8, 4, 4, 4, 1, 1]
    assert table.served(handle) == [(8, 1), (4, 3), (1, 2)]
    table.release(handle)
    step(runner, batch, 1)  # a late step for a request that ended: served as named, nothing written
    assert table.served(handle) == [] and table.rank_for(handle, 8, decoding=True) == 8


@pytest.mark.parametrize("handle", [None, "garbage", "1:2:3", "99999:1", "-1:5"])
def test_a_request_that_is_not_elastic_keeps_its_lora_names_rank(handle):
    """No handle, or one the API server did not write (a client's own vllm_xargs reaching the engine): as named."""
    runner, batch = runner_and_batch(handle, prompt=3)
    assert [step(runner, batch, 3), step(runner, batch, 1)] == [8, 8]
    assert lora_slots._want(runner, batch, 0, 1) == rank.want(8, False)


def test_rows_are_claimed_round_robin_and_a_full_table_says_so(monkeypatch, tmp_path):
    table = elastic.Table(str(tmp_path / "table"))
    handles = [table.claim(4) for _ in range(elastic.ROWS)]
    assert len({h.split(":")[0] for h in handles}) == elastic.ROWS and table.claim(4) is None
    table.release(handles[5])
    again = table.claim(2)
    assert again.split(":")[0] == "5" and again != handles[5]
    table.lower(handles[5], 1)  # the old handle no longer owns the row
    assert int(table.rows["cap"][5]) == 2
