"""A fake Hugging Face Hub for tests: stdlib only, in memory, on 127.0.0.1.

This stands in for huggingface.co because the Hub cannot be reached from here. It implements only the
endpoints the real `huggingface_hub` client calls for what kdlora does (create/delete a model repo,
commit files, repo info, tree listing, file download), with the headers and error shapes measured
against huggingface_hub 2.4. Every upload is answered "regular" at preupload, so file bytes travel
base64-encoded inside the commit and no LFS/Xet storage is involved. Anything else answers 501, so a
call the fake does not know fails loudly instead of being faked.

Deliberate differences from the real Hub: model repos only; a repo id must carry a namespace; only
the `main` branch (plus full 40-hex commit shas for reads); no `cardData` in repo info (parsing YAML
needs more than the stdlib: read README.md instead); no pagination; no pull requests.

    with serve_fake_hub(token="hf_test") as (url, hub):
        HfApi(endpoint=url, token="hf_test").create_repo("me/adapter")
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# What the Hub puts in a new repo's first commit (abridged).
INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
AGENT_HARNESSES = {"standardEnvVars": [], "harnesses": {}}
SHA_RE = re.compile(r"[0-9a-f]{40}")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An error answer; `code` goes into X-Error-Code, which the client maps to an exception class."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None, body: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, {"error": message, **(body or {})}


def _repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository {repo_id} not found", "RepoNotFound")


@dataclass
class Commit:
    sha: str
    parent: str | None
    summary: str
    date: str
    files: dict[str, bytes]  # the full tree at this commit: path -> bytes


@dataclass
class Repo:
    private: bool
    created_at: str
    commits: list[Commit] = field(default_factory=list)  # oldest first; the last one is `main`


class FakeHub:
    """In-memory model repos with history. Thread safe. Also usable directly to seed or inspect state."""

    def __init__(self, token: str | None = None):
        self.token = token  # when set, writes (and reads of private repos) need `Authorization: Bearer <token>`
        self.fail_next_commit = False  # when True, the next commit answers 500 and changes nothing
        self.requests_log: list[tuple[str, str]] = []  # (method, unquoted URL path) of every request
        self._repos: dict[str, Repo] = {}
        self._counter = 0
        self._lock = threading.Lock()

    # --- state ------------------------------------------------------------------------------------

    def create_repo(self, repo_id: str, private: bool = False) -> bool:
        """Create `repo_id` with the Hub's initial `.gitattributes` commit; False if it already exists."""
        with self._lock:
            if repo_id in self._repos:
                return False
            self._repos[repo_id] = Repo(private=private, created_at=_now())
        self.commit(repo_id, {".gitattributes": INITIAL_GITATTRIBUTES}, summary="initial commit")
        return True

    def delete_repo(self, repo_id: str) -> bool:
        with self._lock:
            return self._repos.pop(repo_id, None) is not None

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        deletions: tuple[str, ...] = (),
        summary: str = "",
        parent: str | None = None,
    ) -> str:
        """Apply additions and deletions (a path ending in "/" deletes a folder) to `main`; returns the new sha."""
        with self._lock:
            repo = self._get(repo_id)
            head = repo.commits[-1] if repo.commits else None
            if parent is not None and head is not None and parent != head.sha:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(head.files) if head else {}
            for path in deletions:
                doomed = [p for p in tree if p.startswith(path)] if path.endswith("/") else [path]
                if not doomed or any(p not in tree for p in doomed):
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del tree[p]
            tree.update(files)
            self._counter += 1
            blobs = sorted((p, git_blob_oid(b)) for p, b in tree.items())
            sha = hashlib.sha1(json.dumps([head and head.sha, summary, self._counter, blobs]).encode()).hexdigest()
            repo.commits.append(Commit(sha, head and head.sha, summary, _now(), tree))
            return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            return dict(self._resolve(repo_id, revision)[1].files)

    def commits(self, repo_id: str) -> list[str]:
        """Commit shas of `repo_id`, oldest first."""
        with self._lock:
            return [c.sha for c in self._get(repo_id).commits]

    def repo_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._repos)

    def fetched_files(self, repo_id: str, method: str = "GET") -> list[str]:
        """Repo paths requested from /resolve/ with `method` ("GET" downloads, "HEAD" metadata), in order."""
        prefix = f"/{repo_id}/resolve/"
        with self._lock:
            log = list(self.requests_log)
        return [p[len(prefix) :].split("/", 1)[1] for m, p in log if m == method and p.startswith(prefix)]

    def _get(self, repo_id: str) -> Repo:
        if repo_id not in self._repos:
            raise _repo_not_found(repo_id)
        return self._repos[repo_id]

    def _resolve(self, repo_id: str, revision: str) -> tuple[Repo, Commit]:
        repo = self._get(repo_id)
        if revision == "main":
            return repo, repo.commits[-1]
        found = [c for c in repo.commits if c.sha == revision] if SHA_RE.fullmatch(revision) else []
        if not found:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo, found[0]

    # --- HTTP endpoints: each gets (handler, match groups, parsed body, query) ------------------------

    def _authorized(self, handler) -> bool:
        return self.token is None or handler.headers.get("Authorization") == f"Bearer {self.token}"

    def _require_write(self, handler) -> None:
        if not self._authorized(handler):
            # This exact message keeps the client from reporting a bad token as "repo not found".
            raise HubError(401, "Invalid credentials in Authorization header")

    def _readable(self, handler, repo_id: str, revision: str) -> tuple[Repo, Commit]:
        with self._lock:
            if self._get(repo_id).private and not self._authorized(handler):
                raise _repo_not_found(repo_id)  # the Hub hides private repos rather than saying "forbidden"
            return self._resolve(repo_id, revision)

    def api_create(self, handler, groups, body, query):
        self._require_write(handler)
        if body.get("type", "model") != "model":
            raise HubError(400, "This fake Hub only hosts model repos")
        if not body.get("organization"):
            raise HubError(400, "This fake Hub needs an explicit namespace: 'namespace/name'")
        repo_id = f"{body['organization']}/{body['name']}"
        url = f"{handler.base_url}/{repo_id}"
        if not self.create_repo(repo_id, private=bool(body.get("private")) or body.get("visibility") == "private"):
            # create_repo(exist_ok=True) reads `url` from this 409 body.
            raise HubError(409, "You already created this model repo", body={"url": url})
        return 200, {"url": url, "name": repo_id}

    def api_delete(self, handler, groups, body, query):
        self._require_write(handler)
        repo_id = f"{body.get('organization')}/{body.get('name')}"
        if body.get("type", "model") != "model" or not self.delete_repo(repo_id):
            raise _repo_not_found(repo_id)
        return 200, {}

    def api_info(self, handler, groups, body, query):
        repo_id, revision = groups["repo"], groups["rev"] or "main"
        repo, commit = self._readable(handler, repo_id, revision)
        blobs = query.get("blobs") == "true"
        siblings = [
            {"rfilename": p, **({"size": len(b), "blobId": git_blob_oid(b)} if blobs else {})}
            for p, b in sorted(commit.files.items())
        ]
        return 200, {
            "_id": repo_id,
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(map(len, commit.files.values())),
        }

    def api_tree(self, handler, groups, body, query):
        _, commit = self._readable(handler, groups["repo"], groups["rev"])
        base = (groups["path"] or "").strip("/")
        prefix = base + "/" if base else ""
        recursive = query.get("recursive") == "true"
        entries: dict[str, dict] = {}
        for path, data in commit.files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):  # the folders on the way
                folder = prefix + "/".join(parts[:i])
                entries[folder] = {
                    "type": "directory",
                    "path": folder,
                    "size": 0,
                    "oid": hashlib.sha1(folder.encode()).hexdigest(),
                }
            if len(parts) <= depth:
                entries[path] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
        if base and not entries:
            raise HubError(404, f"{base} does not exist on {commit.sha}", "EntryNotFound")
        return 200, [entries[p] for p in sorted(entries)]

    def api_preupload(self, handler, groups, body, query):
        self._require_write(handler)
        _, head = self._readable(handler, groups["repo"], groups["rev"])
        # "regular" for everything: bytes come base64 inside the commit ("lfs" would send the client to Xet).
        # `oid` of an existing file lets the client skip unchanged files, as on the real Hub.
        return 200, {
            "files": [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(head.files[f["path"]]) if f["path"] in head.files else None,
                }
                for f in body.get("files", [])
            ]
        }

    def api_commit(self, handler, groups, body, query):
        self._require_write(handler)
        repo_id = groups["repo"]
        self._readable(handler, repo_id, groups["rev"])
        if groups["rev"] != "main" or query.get("create_pr"):
            raise HubError(400, "This fake Hub only commits to the main branch")
        header, files, deletions = {}, {}, []
        for line in body:
            key, value = line["key"], line["value"]
            if key == "header":
                header = value
            elif key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append(value["path"].rstrip("/") + ("/" if key == "deletedFolder" else ""))
            else:
                raise HubError(400, f"This fake Hub does not accept commit lines of kind {key!r}")
        with self._lock:
            fail, self.fail_next_commit = self.fail_next_commit, False
        if fail:
            raise HubError(500, "Internal Error - injected by FakeHub.fail_next_commit")
        summary = header.get("summary", "")
        sha = self.commit(repo_id, files, tuple(deletions), summary=summary, parent=header.get("parentCommit"))
        return 200, {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{handler.base_url}/{repo_id}/commit/{sha}",
            "commitMessage": summary,
            "pullRequestUrl": None,
        }

    def resolve(self, handler, groups, body, query):
        repo_id, path = groups["repo"], groups["path"]
        _, commit = self._readable(handler, repo_id, groups["rev"])
        if path not in commit.files:
            # X-Repo-Commit lets the client cache "this file does not exist at this commit".
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_oid(data)}"', "Accept-Ranges": "bytes"}
        status, ranged = 200, re.fullmatch(r"bytes=(\d+)-(\d*)", handler.headers.get("Range", ""))
        if ranged:  # resumed download
            start, end = int(ranged[1]), int(ranged[2] or len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            status, data = 206, data[start : end + 1]
        return status, data, headers


# (methods, path regex, FakeHub method name). Paths are matched still URL-quoted: the client quotes
# the revision and tree path with safe="", so "/" inside them arrives as %2F.
_REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ({"POST"}, r"/api/repos/create", "api_create"),
    ({"DELETE"}, r"/api/repos/delete", "api_delete"),
    ({"GET"}, rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "api_info"),
    ({"GET"}, rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "api_tree"),
    ({"POST"}, rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "api_preupload"),
    ({"POST"}, rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "api_commit"),
    ({"HEAD", "GET"}, rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"

    def log_message(self, *args):  # quiet: the request log is in FakeHub.requests_log
        pass

    @property
    def base_url(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        hub: FakeHub = self.server.hub
        url = urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # always drain the body first
        with hub._lock:
            hub.requests_log.append((method, unquote(url.path)))
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            result = self._dispatch(hub, method, url.path, raw, query)
        except HubError as e:
            headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            result = (e.status, e.body, headers)
        status, payload, headers = (*result, {}) if len(result) == 2 else result
        self._send(method, status, payload, headers)

    def _dispatch(self, hub: FakeHub, method: str, path: str, raw: bytes, query: dict):
        if path == "/api/agent-harnesses":
            return 200, AGENT_HARNESSES
        if path == "/api/validate-yaml" and method == "POST":
            return 200, {"errors": [], "warnings": []}
        if re.match(r"/api/(datasets|spaces)/", path):
            raise HubError(400, "This fake Hub only hosts model repos")
        for methods, pattern, name in ROUTES:
            m = re.fullmatch(pattern, path)
            if m and method in methods:
                groups = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
                if name == "api_commit":  # NDJSON
                    body = [json.loads(line) for line in raw.splitlines() if line.strip()]
                else:
                    body = json.loads(raw) if raw else {}
                return getattr(hub, name)(self, groups, body, query)
        raise HubError(501, f"FakeHub does not implement {method} {path}")

    def _send(self, method: str, status: int, payload, headers: dict) -> None:
        if isinstance(payload, bytes):
            data, ctype = payload, "application/octet-stream"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)


@contextlib.contextmanager
def serve_fake_hub(token: str | None = None):
    """Serve a fresh FakeHub on 127.0.0.1 (free port, daemon thread); yields (base_url, hub)."""
    hub = FakeHub(token=token)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.hub = hub
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def point_client_at(monkeypatch, base_url: str, hf_home) -> None:
    """Make the already imported huggingface_hub (and any subprocess) use `base_url` and an isolated HF_HOME.

    huggingface_hub reads its environment once, at import, into `huggingface_hub.constants`; so both the
    environment (for subprocesses) and those constants (for this process) are patched. No token is
    picked up from the environment: pass `token=` explicitly.
    """
    import os

    from huggingface_hub import constants  # lazy: the server above needs nothing outside the stdlib

    home = str(hf_home)
    env = {
        "HF_ENDPOINT": base_url,
        "HF_HOME": home,
        "HF_HUB_CACHE": os.path.join(home, "hub"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_XET_CACHE", "HF_ASSETS_CACHE"):
        monkeypatch.delenv(k, raising=False)
    patched = {
        "ENDPOINT": base_url,
        "HUGGINGFACE_CO_URL_TEMPLATE": base_url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HOME": home,
        "HF_HUB_CACHE": os.path.join(home, "hub"),
        "HF_ASSETS_CACHE": os.path.join(home, "assets"),
        "HF_XET_CACHE": os.path.join(home, "xet"),
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json"),
    }
    for k, v in patched.items():
        if hasattr(constants, k):
            monkeypatch.setattr(constants, k, v)
