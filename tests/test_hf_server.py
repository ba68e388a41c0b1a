"""The fake Hub (tests/hf_server.py) driven by the real huggingface_hub client, no mocks.

These pin down that the fake answers what the client needs, so Hub code tested against it behaves as it
would against huggingface.co.
"""

import os
import pickle

import pytest
from hf_server import point_client_at, serve_fake_hub
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

TOKEN = "hf_fake_write_token"
REPO = "kd/student-adapter"
README = b"---\nlicense: apache-2.0\nbase_model: tiny/teacher\ntags:\n- kdlora\n---\n# Student adapter\n"
WEIGHTS = bytes(range(256)) * 8 + b"\x00\xff"  # every byte value, not valid UTF-8
PICKLED = pickle.dumps({"never": "load me"})


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(url, hub, api): a fresh fake Hub that needs TOKEN for writes, with the client pointed at it."""
    with serve_fake_hub(token=TOKEN) as (url, hub):
        point_client_at(monkeypatch, url, tmp_path / "hf_home")
        yield url, hub, HfApi(endpoint=url, token=TOKEN)


def _push(api, repo=REPO, **files):
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=b) for p, b in files.items()]
    return api.create_commit(repo, operations=ops, commit_message="push")


@pytest.fixture
def pushed(fake):
    """The fake with REPO holding a README, a config, nested binary weights and a pickle."""
    url, hub, api = fake
    api.create_repo(REPO)
    info = _push(
        api,
        **{
            "README.md": README,
            "adapter_config.json": b'{"r": 4}',
            "r4/adapter_model.safetensors": WEIGHTS,
            "training_args.bin": PICKLED,
        },
    )
    return url, hub, api, info


def test_create_repo_and_exist_ok(fake):
    url, hub, api = fake
    assert api.create_repo(REPO).repo_id == REPO
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert hub.files(REPO) == {".gitattributes": hub.files(REPO)[".gitattributes"]}  # like the Hub's first commit


def test_commit_info_and_listing(pushed):
    url, hub, api, info = pushed
    assert info.oid == hub.commits(REPO)[-1] and len(info.oid) == 40
    expected = {
        ".gitattributes",
        "README.md",
        "adapter_config.json",
        "r4/adapter_model.safetensors",
        "training_args.bin",
    }
    model = api.model_info(REPO)
    assert model.sha == info.oid and model.private is False
    assert {s.rfilename for s in model.siblings} == expected
    assert set(api.list_repo_files(REPO)) == expected
    assert hub.files(REPO)["r4/adapter_model.safetensors"] == WEIGHTS
    assert hub.files(REPO)["README.md"] == README
    assert ("POST", "/api/validate-yaml") in hub.requests_log  # the client checks README front matter first
    folders = [e.path for e in api.list_repo_tree(REPO) if not hasattr(e, "size")]
    assert folders == ["r4"]


def test_hf_hub_download(pushed, tmp_path):
    url, hub, api, info = pushed
    path = hf_hub_download(REPO, "r4/adapter_model.safetensors", endpoint=url, cache_dir=tmp_path / "c")
    assert open(path, "rb").read() == WEIGHTS
    assert f"/snapshots/{info.oid}/" in path
    # Without endpoint=: point_client_at made the client's defaults point at the fake Hub.
    default_path = hf_hub_download(REPO, "README.md")
    assert open(default_path, "rb").read() == README
    assert default_path.startswith(str(tmp_path / "hf_home"))  # not the user's cache
    assert hub.fetched_files(REPO) == ["r4/adapter_model.safetensors", "README.md"]


def test_snapshot_download_never_fetches_disallowed_files(pushed, tmp_path):
    url, hub, api, info = pushed
    folder = snapshot_download(
        REPO, allow_patterns=["*.json", "*.safetensors", "README.md"], endpoint=url, cache_dir=tmp_path / "c"
    )
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "r4"]
    assert open(os.path.join(folder, "r4", "adapter_model.safetensors"), "rb").read() == WEIGHTS
    assert "training_args.bin" not in hub.fetched_files(REPO, "GET") + hub.fetched_files(REPO, "HEAD")
    assert sorted(hub.fetched_files(REPO)) == ["README.md", "adapter_config.json", "r4/adapter_model.safetensors"]


def test_old_commit_still_serves_old_content(pushed, tmp_path):
    url, hub, api, first = pushed
    second = api.create_commit(
        REPO,
        commit_message="v2",
        operations=[
            CommitOperationAdd(path_in_repo="adapter_config.json", path_or_fileobj=b'{"r": 8}'),
            CommitOperationDelete(path_in_repo="training_args.bin"),
        ],
    )
    assert second.oid != first.oid and hub.commits(REPO)[-2:] == [first.oid, second.oid]

    def read(revision):
        return open(
            hf_hub_download(REPO, "adapter_config.json", revision=revision, endpoint=url, cache_dir=tmp_path / "c"),
            "rb",
        ).read()

    assert read(first.oid) == b'{"r": 4}'
    assert read("main") == b'{"r": 8}'
    assert api.model_info(REPO, revision=first.oid).sha == first.oid
    assert "training_args.bin" in api.list_repo_files(REPO, revision=first.oid)
    assert "training_args.bin" not in api.list_repo_files(REPO)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="0" * 40)


def test_unchanged_files_make_no_commit(pushed):
    url, hub, api, info = pushed
    again = _push(api, **{"adapter_config.json": b'{"r": 4}'})  # preupload's oid lets the client skip it
    assert again.oid == info.oid and hub.commits(REPO)[-1] == info.oid


def test_upload_folder_with_delete_patterns(pushed, tmp_path):
    url, hub, api, info = pushed
    (tmp_path / "out" / "r8").mkdir(parents=True)
    (tmp_path / "out" / "r8" / "adapter_model.safetensors").write_bytes(b"r8 weights")
    (tmp_path / "out" / "adapter_config.json").write_bytes(b'{"r": 8}')
    api.upload_folder(repo_id=REPO, folder_path=tmp_path / "out", delete_patterns=["r4/*", "*.bin"])
    assert set(hub.files(REPO)) == {
        ".gitattributes",
        "README.md",
        "adapter_config.json",
        "r8/adapter_model.safetensors",
    }
    assert hub.files(REPO)["adapter_config.json"] == b'{"r": 8}'


def test_missing_file_and_missing_repo(pushed, tmp_path):
    url, hub, api, info = pushed
    with pytest.raises(RemoteEntryNotFoundError) as err:  # the remote kind: the Hub said so, no cache fallback
        hf_hub_download(REPO, "nope.safetensors", endpoint=url, cache_dir=tmp_path / "c")
    assert isinstance(err.value, EntryNotFoundError)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("kd/absent", "README.md", endpoint=url, cache_dir=tmp_path / "c")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("kd/absent")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("kd/absent", endpoint=url, cache_dir=tmp_path / "c")


def test_writes_need_the_token(pushed):
    url, hub, api, info = pushed
    for token in (False, "hf_wrong"):
        anonymous = HfApi(endpoint=url, token=token)
        for write in (
            lambda api=anonymous: api.create_repo("kd/other"),
            lambda api=anonymous: _push(api, **{"x.txt": b"x"}),
            lambda api=anonymous: api.delete_repo(REPO),
        ):
            with pytest.raises(HfHubHTTPError) as err:
                write()
            assert err.value.response.status_code == 401
            assert not isinstance(err.value, RepositoryNotFoundError)
    assert hub.repo_ids() == [REPO] and hub.commits(REPO)[-1] == info.oid
    assert anonymous.model_info(REPO).sha == info.oid  # public reads need no token


def test_private_repo_is_hidden_without_token(fake, tmp_path):
    url, hub, api = fake
    api.create_repo("kd/private", private=True)
    _push(api, "kd/private", **{"a.json": b"{}"})
    assert api.model_info("kd/private").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=url, token=False).model_info("kd/private")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("kd/private", "a.json", endpoint=url, token=False, cache_dir=tmp_path / "c")
    assert hf_hub_download("kd/private", "a.json", endpoint=url, token=TOKEN, cache_dir=tmp_path / "c")


def test_failed_commit_changes_nothing(pushed):
    url, hub, api, info = pushed
    before = hub.files(REPO)
    hub.fail_next_commit = True
    with pytest.raises(HfHubHTTPError) as err:
        _push(api, **{"adapter_config.json": b'{"r": 16}', "r16/adapter_model.safetensors": b"w"})
    assert err.value.response.status_code == 500
    assert hub.commits(REPO)[-1] == info.oid and hub.files(REPO) == before
    assert api.model_info(REPO).sha == info.oid
    assert _push(api, **{"adapter_config.json": b'{"r": 16}'}).oid != info.oid  # the failure fires once


def test_delete_repo(pushed):
    url, hub, api, info = pushed
    api.delete_repo(REPO)
    assert hub.repo_ids() == []
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(REPO)
    api.delete_repo(REPO, missing_ok=True)


def test_unimplemented_endpoints_fail_loudly(pushed):
    url, hub, api, info = pushed
    with pytest.raises(HfHubHTTPError) as err:
        api.list_repo_commits(REPO)
    assert err.value.response.status_code == 501
