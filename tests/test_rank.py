"""The rank protocol (kdlora_serve/rank.py): names, the want packed into vLLM's LoRA mapping, per-token rank and scale."""

import pytest
import torch

from kdlora_serve.errors import RequestError
from kdlora_serve.rank import (
    RANK_STRIDE,
    kdlora_name,
    model_name,
    pack,
    scale_ratio,
    split_model_name,
    token_ranks,
    unpack,
    want,
)


def test_names():
    assert split_model_name("org/a@r8") == ("org/a", 8) and model_name("org/a", 8) == "org/a@r8"
    assert split_model_name("org/a") == ("org/a", None)
    assert split_model_name("org/a@b@r2") == ("org/a@b", 2)  # the rank is the last @r
    with pytest.raises(
        RequestError, match=r"'org/a@rX': the rank after '@r' must be a whole number in ASCII digits, e.g. org/a@r8"
    ):
        split_model_name("org/a@rX")
    assert kdlora_name("org/a@rX") == (None, None) and kdlora_name("org/a@r3") == ("org/a", 3)  # never raises


@pytest.mark.parametrize("model", ["a@r\u00b2", "a@r\u0668", "a@r" + "9" * 500, "a@r-1", "a@r 8", "a@r8\n"])
def test_only_ascii_digit_ranks(model):
    with pytest.raises(RequestError, match="the rank after '@r' must be a whole number in ASCII digits"):
        split_model_name(model)


def test_overlong_model_names_are_refused_before_any_lookup():
    with pytest.raises(RequestError, match=r"model name 'xxxx.*' is 20003 characters long; at most 512"):
        split_model_name("x" * 20_000 + "@r8")


def test_the_want_survives_vllms_mapping():
    """A want folded into a LoRA id comes back out unchanged, for ids and wants at their extremes."""
    ids = torch.tensor([0, 1, 7, RANK_STRIDE - 1])
    wants = torch.tensor([want(None, False), want(1, False), want(8, True), want(512, True)])
    assert wants.tolist() == [0, 2, 17, 1025]
    back_ids, back_wants = unpack(pack(ids, wants))
    assert back_ids.tolist() == ids.tolist() and back_wants.tolist() == wants.tolist()
    assert pack(3, 0) == 3  # no want: vLLM's own id, untouched


def test_token_ranks_and_scales():
    """want 0 = the slot's full rank; a rank above the slot's is cut to it; alpha/k over alpha/R (sqrt with rsLoRA)."""
    wants = torch.tensor([0, want(4, False), want(4, True), want(32, False)])
    assert token_ranks(wants, 16).tolist() == [16, 4, 4, 16]
    torch.testing.assert_close(scale_ratio(wants, 16), torch.tensor([1.0, 4.0, 2.0, 0.5]))
    torch.testing.assert_close(scale_ratio(wants, torch.tensor([16, 8, 8, 32])), torch.tensor([1.0, 2.0, 2**0.5, 1.0]))
