"""A small in-memory Hugging Face Hub for offline tests.

`LocalHub` serves, over plain HTTP on 127.0.0.1, the parts of the Hub HTTP API that huggingface_hub 2.4
uses to create a repo, upload to it and download from it:

- `POST /api/repos/create`, `GET /api/whoami-v2`, `POST /api/validate-yaml`
- `POST /api/{type}s/{repo}/preupload/{rev}` (upload mode per file: "regular" or "lfs")
- `POST /{prefix}{repo}.git/info/lfs/objects/batch` (LFS batch API, "basic" transfer) with its upload URL
  (`PUT /_lfs/upload/{oid}`, served as if by a storage host) and verify URL
- `POST /api/{type}s/{repo}/commit/{rev}` (NDJSON: header, file (base64), lfsFile, deletedFile, deletedFolder)
- `GET /api/{type}s/{repo}[/revision/{rev}]` (model_info / dataset_info / repo_info), `.../tree/{rev}[/{path}]`,
  `POST .../paths-info/{rev}`, `GET .../refs`, `GET .../commits/{rev}`, `POST .../branch/{name}`
- `HEAD|GET /{prefix}{repo}/resolve/{rev}/{path}` with the headers `hf_hub_download` checks: `X-Repo-Commit`,
  `ETag` (git blob id), `Content-Length`; LFS files answer `302` to a storage URL on another host name
  (`localhost` instead of `127.0.0.1`) with `X-Linked-Etag` (sha256) and `X-Linked-Size`, like the Hub's CDN.

Xet is not spoken: huggingface_hub uploads LFS files through Xet whenever `hf_xet` is installed, so the client must
run with Xet disabled (`HF_HUB_DISABLE_XET=1`, or `huggingface_hub.constants.HF_HUB_DISABLE_XET = True`); it then
falls back to the LFS batch API above. `configure_hf_client` and the `local_hub` fixture do this.

huggingface_hub reads `HF_ENDPOINT`, `HF_HOME` etc. at import time, so setting environment variables is not
enough inside an already running interpreter: `configure_hf_client` patches `huggingface_hub.constants`, the
module-level `HfApi` instance and transformers' cached `HfApi`, and also sets the environment variables so that
subprocesses started by the test see the same hub.
"""

from __future__ import annotations

import base64
import datetime as _dt
import fnmatch
import hashlib
import json
import socket
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


DEFAULT_TOKEN = "hf_local_hub_test_token"
DEFAULT_USER = "local-user"

# The Hub's default `.gitattributes` of a new repo (the LFS-tracked patterns).
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
    "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
    "*.xz", "*.zip", "*.zst", "*tfevents*",
)  # fmt: skip
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores anything above 10 MB with LFS
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_id(data: bytes) -> str:
    """The git object id (sha1 of `blob <size>\\0<data>`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit: regular files keep their bytes; LFS files point into the LFS store by sha256."""

    size: int
    blob_id: str  # git id of the content (regular) or of the LFS pointer (LFS)
    content: bytes | None = None  # regular files only
    lfs_sha256: str | None = None  # LFS files only
    lfs_pointer_size: int | None = None

    @property
    def etag(self) -> str:
        return self.lfs_sha256 or self.blob_id


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or "refs/pr/N" -> commit oid

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if revision in self.commits:
            return self.commits[revision]
        return None


class HubError(Exception):
    """An error answer: status, `X-Error-Code` and message (sent as JSON `{"error": message}`)."""

    def __init__(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.extra = status, message, error_code, extra or {}


class LocalHub:
    """An in-memory Hub served on `127.0.0.1:<free port>` from a background thread.

    Attributes: `endpoint` (e.g. "http://127.0.0.1:43125"), `token` (the only token accepted for writes and
    private reads), `user`, `requests` (every request as `(method, path)`, for tests to check that the client
    really hit this server), `unhandled` (requests no route answered).
    """

    def __init__(self, token: str = DEFAULT_TOKEN, user: str = DEFAULT_USER, orgs: tuple[str, ...] = ("org",)):
        self.token, self.user, self.orgs = token, user, tuple(orgs)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._upload_secrets: dict[str, str] = {}  # sha256 -> signature of its presigned upload URL
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.port: int | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("LocalHub is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_endpoint(self) -> str:
        """Where LFS content is uploaded to and downloaded from: another host name, like the Hub's S3/CDN."""
        return f"http://localhost:{self.port}"

    def start(self) -> "LocalHub":
        hub = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def process_request(self, request, client_address):
                with hub._lock:
                    hub._connections.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request):
                with hub._lock:
                    hub._connections.discard(request)
                super().shutdown_request(request)

        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = Server(("127.0.0.1", 0), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections (a later request gets 'connection refused')."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests
    def repo_url(self, repo_id: str, repo_type: str = "model") -> str:
        return f"{self.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"

    def list_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, StoredFile]:
        """The files of `repo_id` at `revision` as stored by the server (path -> StoredFile)."""
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            return dict(repo.resolve(revision).files)

    def file_bytes(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        entry = self.list_files(repo_id, repo_type, revision)[path]
        return entry.content if entry.lfs_sha256 is None else self.lfs_objects[entry.lfs_sha256]

    # ------------------------------------------------------------------ state changes
    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> Repo:
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(
                    409, f"You already created this {repo_type} repo", extra={"url": self.repo_url(repo_id, repo_type)}
                )
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
            self.repos[(repo_type, repo_id)] = repo
            data = GITATTRIBUTES
            gitattributes = StoredFile(size=len(data), blob_id=git_blob_id(data), content=data)
            self._add_commit(repo, "main", None, "initial commit", "", {".gitattributes": gitattributes})
            return repo

    def _add_commit(
        self, repo: Repo, ref: str, parent: str | None, title: str, message: str, files: dict[str, StoredFile]
    ) -> Commit:
        manifest = json.dumps(
            {"parent": parent, "title": title, "message": message, "files": {p: f.blob_id for p, f in files.items()},
             "nonce": uuid.uuid4().hex},
            sort_keys=True,
        )  # fmt: skip
        oid = hashlib.sha1(manifest.encode()).hexdigest()
        commit = Commit(oid=oid, parent=parent, title=title, message=message, date=_now(), files=files)
        repo.commits[oid] = commit
        repo.refs[ref] = oid
        return commit


def _is_lfs_path(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in LFS_PATTERNS)


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub  # set on the subclass made by LocalHub.start
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections are dropped after this

    def log_message(self, format, *args):  # silence the default stderr log
        pass

    # ------------------------------------------------------------------ plumbing
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        headers = {"Content-Type": content_type, **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None, content_type="application/json"):
        self._send(status, json.dumps(payload).encode(), headers, content_type)

    def _dispatch(self, method: str):
        split = urlsplit(self.path)
        path, self.query = split.path, parse_qs(split.query)
        self.host = (self.headers.get("Host") or "").split(":")[0]
        body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
        with self.hub._lock:
            self.hub.requests.append((method, path))
        try:
            for route in _ROUTES:
                if route(self, method, path, body) is not False:
                    return
            with self.hub._lock:
                self.hub.unhandled.append((method, path))
            raise HubError(404, f"local hub: no route for {method} {path}")
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.error_code:
                headers["X-Error-Code"] = err.error_code
            headers.update(err.extra.pop("_headers", {}))
            self._json(err.status, {"error": err.message, **err.extra}, headers)
        except (ConnectionError, BrokenPipeError):
            pass

    # ------------------------------------------------------------------ auth and lookups
    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _require_auth(self):
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        if write:
            self._require_auth()
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit


# ---------------------------------------------------------------------- routes
# Each route returns False when the request is not for it; otherwise it answers (or raises HubError).


def _parse_api_repo(path: str):
    """`/api/{models|datasets|spaces}/{ns}/{name}{rest}` -> (repo_type, repo_id, rest) or None."""
    parts = path.split("/")
    if len(parts) < 5 or parts[1] != "api" or parts[2] not in REPO_TYPES:
        return None
    return REPO_TYPES[parts[2]], f"{unquote(parts[3])}/{unquote(parts[4])}", "/".join(parts[5:])


def route_misc(h: _Handler, method: str, path: str, body: bytes):
    if method == "POST" and path == "/api/repos/create":
        h._require_auth()
        payload = json.loads(body or b"{}")
        namespace = payload.get("organization") or h.hub.user
        if namespace not in (h.hub.user, *h.hub.orgs):
            raise HubError(403, f"You don't have the rights to create a repo under the namespace '{namespace}'")
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{payload['name']}"
        h.hub.create_repo(repo_type, repo_id, private=payload.get("visibility") == "private")
        url = h.hub.repo_url(repo_id, repo_type)
        return h._json(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex})
    if method == "GET" and path == "/api/whoami-v2":
        h._require_auth()
        return h._json(
            200,
            {
                "type": "user", "id": "local", "name": h.hub.user, "fullname": "Local Hub User",
                "orgs": [{"type": "org", "name": o, "roleInOrg": "admin"} for o in h.hub.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            },
        )  # fmt: skip
    if method == "POST" and path == "/api/validate-yaml":
        content = json.loads(body or b"{}").get("content", "")
        errors = []
        if content.startswith("---"):
            try:
                metadata = yaml.safe_load(content.split("---", 2)[1])
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append("YAML metadata must be a mapping")
            except (yaml.YAMLError, IndexError) as err:
                errors.append(f"Invalid YAML: {err}")
        if errors:
            return h._json(400, {"errors": [{"message": e} for e in errors]}, {"X-Error-Message": errors[0]})
        return h._json(200, {"warnings": []})
    if method == "POST" and path.startswith("/api/telemetry"):
        return h._json(200, {})
    return False


def route_lfs(h: _Handler, method: str, path: str, body: bytes):
    hub = h.hub
    # Presigned upload URL (on the "storage" host name): no Authorization header is sent there.
    if path.startswith("/_lfs/upload/") and method == "PUT":
        oid = path.rsplit("/", 1)[-1]
        with hub._lock:
            expected_sig = hub._upload_secrets.get(oid)
        if expected_sig is None or h.query.get("sig", [""])[0] != expected_sig:
            raise HubError(403, "Invalid or expired upload signature")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match its sha256 {oid}")
        with hub._lock:
            hub.lfs_objects[oid] = body
        return h._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
    # Storage download URL ("CDN"): content by sha256, no auth (the Hub signs these URLs).
    if path.startswith("/_lfs/objects/") and method in ("GET", "HEAD"):
        oid = path.rsplit("/", 1)[-1]
        data = hub.lfs_objects.get(oid)
        if data is None:
            raise HubError(404, "No such object")
        return _send_content(h, data, {"ETag": f'"{oid}"'})
    if path.endswith(".git/info/lfs/objects/batch") and method == "POST":
        repo_type, repo_id = _parse_git_repo(path[: -len(".git/info/lfs/objects/batch")])
        with hub._lock:
            h._repo(repo_type, repo_id, write=True)
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "local hub: only the 'upload' LFS operation is served")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "local hub: only the 'basic' LFS transfer is served")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            with hub._lock:
                present = oid in hub.lfs_objects
                if not present:
                    hub._upload_secrets.setdefault(oid, uuid.uuid4().hex)
                    sig = hub._upload_secrets[oid]
            if not present:
                verify_url = f"{hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify"
                entry["actions"] = {
                    "upload": {"href": f"{hub.storage_endpoint}/_lfs/upload/{oid}?sig={sig}", "expires_in": 900},
                    "verify": {"href": verify_url, "header": {"Authorization": f"Bearer {hub.token}"}},
                }
            objects.append(entry)
        return h._json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")
    if path.endswith(".git/info/lfs/objects/verify") and method == "POST":
        payload = json.loads(body)
        data = hub.lfs_objects.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            raise HubError(404, f"LFS object {payload['oid']} was not uploaded (or has another size)")
        return h._json(200, {"success": True})
    return False


def _parse_git_repo(prefix_path: str) -> tuple[str, str]:
    parts = [unquote(p) for p in prefix_path.strip("/").split("/")]
    if parts[0] in ("datasets", "spaces"):
        return REPO_TYPES[parts[0]], "/".join(parts[1:])
    return "model", "/".join(parts)


def _tree_entry(path: str, f: StoredFile) -> dict:
    entry = {"type": "file", "oid": f.blob_id, "size": f.size, "path": path}
    if f.lfs_sha256 is not None:
        entry["lfs"] = {"oid": f.lfs_sha256, "size": f.size, "pointerSize": f.lfs_pointer_size}
    return entry


def _folders(files: dict[str, StoredFile]) -> set[str]:
    return {p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)}


def _folder_entry(folder: str) -> dict:
    return {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder}


def route_api_repo(h: _Handler, method: str, path: str, body: bytes):
    parsed = _parse_api_repo(path)
    if parsed is None:
        return False
    repo_type, repo_id, rest = parsed
    hub = h.hub
    with hub._lock:
        # repo_info: /api/models/{id} and /api/models/{id}/revision/{rev}
        if method == "GET" and (rest == "" or rest.startswith("revision/")):
            repo = h._repo(repo_type, repo_id)
            commit = h._commit(repo, rest[len("revision/") :] if rest else "main")
            blobs = h.query.get("blobs", ["false"])[0].lower() in ("1", "true")
            siblings = []
            for p, f in sorted(commit.files.items()):
                sibling = {"rfilename": p}
                if blobs:
                    sibling.update(size=f.size, blobId=f.blob_id)
                    if f.lfs_sha256:
                        sibling["lfs"] = {"size": f.size, "sha256": f.lfs_sha256, "pointerSize": f.lfs_pointer_size}
                siblings.append(sibling)
            info = {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": repo_id.split("/")[0],
                "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            }  # fmt: skip
            if repo_type == "model":
                info["modelId"] = repo_id
            if repo_type == "space":
                info["sdk"] = "static"
            return h._json(200, info)
        # list_repo_tree: /api/models/{id}/tree/{rev}[/{path}]
        if method == "GET" and rest.startswith("tree/"):
            repo = h._repo(repo_type, repo_id)
            rev, _, sub = rest[len("tree/") :].partition("/")
            commit = h._commit(repo, rev)
            sub = unquote(sub).strip("/")
            recursive = h.query.get("recursive", ["false"])[0].lower() in ("1", "true")
            folders = _folders(commit.files)
            if sub and sub not in folders:
                if sub in commit.files:
                    return h._json(200, [_tree_entry(sub, commit.files[sub])])
                raise HubError(404, f"{sub} does not exist on {rev}", "EntryNotFound")
            prefix = f"{sub}/" if sub else ""

            def wanted(p: str) -> bool:
                return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

            entries = [_folder_entry(d) for d in sorted(folders) if wanted(d)]
            entries += [_tree_entry(p, f) for p, f in sorted(commit.files.items()) if wanted(p)]
            return h._json(200, entries)
        # get_paths_info: POST /api/models/{id}/paths-info/{rev}, form-encoded `paths`
        if method == "POST" and rest.startswith("paths-info/"):
            repo = h._repo(repo_type, repo_id)
            commit = h._commit(repo, rest[len("paths-info/") :])
            form = parse_qs(body.decode())
            folders = _folders(commit.files)
            out = []
            for p in form.get("paths", []):
                p = p.strip("/")
                if p in commit.files:
                    out.append(_tree_entry(p, commit.files[p]))
                elif p in folders:
                    out.append(_folder_entry(p))
            return h._json(200, out)
        if method == "GET" and rest == "refs":
            repo = h._repo(repo_type, repo_id)
            branches = [
                {"name": r, "ref": f"refs/heads/{r}", "targetCommit": c} for r, c in repo.refs.items()
                if not r.startswith("refs/pr/")
            ]  # fmt: skip
            prs = [{"name": r, "ref": r, "targetCommit": c} for r, c in repo.refs.items() if r.startswith("refs/pr/")]
            return h._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": prs})
        if method == "GET" and rest.startswith("commits/"):
            repo = h._repo(repo_type, repo_id)
            commit, history = h._commit(repo, rest[len("commits/") :]), []
            while commit is not None:
                history.append(
                    {"id": commit.oid, "title": commit.title, "message": commit.message, "date": commit.date,
                     "authors": [{"user": hub.user}]}
                )  # fmt: skip
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return h._json(200, history)
        if method == "POST" and rest.startswith("branch/"):
            repo = h._repo(repo_type, repo_id, write=True)
            branch = unquote(rest[len("branch/") :])
            if branch in repo.refs:
                raise HubError(409, f"Reference already exists: {branch}")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.refs[branch] = h._commit(repo, start).oid
            return h._json(200, {})
        if method == "POST" and rest.startswith("preupload/"):
            repo = h._repo(repo_type, repo_id, write=True)
            revision = rest[len("preupload/") :]
            commit = repo.resolve(unquote(revision)) or repo.commits[repo.refs["main"]]
            files = []
            for f in json.loads(body)["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = _is_lfs_path(f["path"]) or f["size"] > LFS_SIZE_THRESHOLD or b"\0" in sample
                existing = commit.files.get(f["path"])
                files.append(
                    {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                     "oid": existing.etag if existing is not None else None}
                )  # fmt: skip
            return h._json(200, {"files": files, "commitOid": commit.oid})
        if method == "POST" and rest.startswith("commit/"):
            return _commit_route(h, repo_type, repo_id, unquote(rest[len("commit/") :]), body)
        if "xet-" in rest:
            raise HubError(501, "local hub does not speak Xet: set HF_HUB_DISABLE_XET=1 to upload through LFS")
    return False


def _commit_route(h: _Handler, repo_type: str, repo_id: str, revision: str, body: bytes):
    hub = h.hub
    repo = h._repo(repo_type, repo_id, write=True)
    if h.headers.get("Content-Type", "").split(";")[0] != "application/x-ndjson":
        raise HubError(400, "commit payload must be application/x-ndjson")
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, "the first NDJSON line of a commit must be its header")
    header = lines[0]["value"]
    create_pr = h.query.get("create_pr", ["0"])[0] == "1"
    base = h._commit(repo, revision)
    if header.get("parentCommit") and header["parentCommit"] != base.oid:
        raise HubError(412, f"parentCommit {header['parentCommit']} is not the head of {revision} ({base.oid})")
    files = dict(base.files)
    for line in lines[1:]:
        key, value = line["key"], line["value"]
        path = value["path"].strip("/")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"unsupported encoding {value.get('encoding')} for {path}")
            data = base64.b64decode(value["content"])
            files[path] = StoredFile(size=len(data), blob_id=git_blob_id(data), content=data)
        elif key == "lfsFile":
            oid = value["oid"]
            data = hub.lfs_objects.get(oid)
            if data is None:
                raise HubError(400, f"LFS object {oid} for {path} was never uploaded")
            if value.get("size") is not None and value["size"] != len(data):
                raise HubError(400, f"size of {path} ({value['size']}) does not match its LFS object ({len(data)})")
            pointer = lfs_pointer(oid, len(data))
            files[path] = StoredFile(
                size=len(data), blob_id=git_blob_id(pointer), lfs_sha256=oid, lfs_pointer_size=len(pointer)
            )
        elif key == "deletedFile":
            if path not in files:
                raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            del files[path]
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, "A folder with this name doesn't exist", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"local hub: unsupported commit operation {key!r}")
    ref = revision
    if create_pr:
        ref = f"refs/pr/{1 + sum(r.startswith('refs/pr/') for r in repo.refs)}"
    elif revision not in repo.refs:
        raise HubError(400, f"cannot commit to {revision}: not a branch")
    commit = hub._add_commit(repo, ref, base.oid, header.get("summary", ""), header.get("description", ""), files)
    url = f"{hub.repo_url(repo_id, repo_type)}/commit/{commit.oid}"
    pr_url = f"{hub.repo_url(repo_id, repo_type)}/discussions/{ref.rsplit('/', 1)[-1]}" if create_pr else None
    return h._json(200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": pr_url})


def _send_content(h: _Handler, data: bytes, headers: dict):
    """Answer GET/HEAD with `data`, honouring a single `Range: bytes=a-b` request."""
    headers = {"Accept-Ranges": "bytes", **headers}
    rng = h.headers.get("Range")
    if rng and rng.startswith("bytes=") and h.command == "GET":
        start_s, _, end_s = rng[len("bytes=") :].partition("-")
        start = int(start_s) if start_s else max(0, len(data) - int(end_s))
        end = int(end_s) if (end_s and start_s) else len(data) - 1
        if start >= len(data):
            return h._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
        part = data[start : end + 1]
        headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
        return h._send(206, part, headers, "application/octet-stream")
    return h._send(200, data, headers, "application/octet-stream")


def route_resolve(h: _Handler, method: str, path: str, body: bytes):
    """`HEAD|GET /[datasets/|spaces/]{ns}/{name}/resolve/{rev}/{path}`."""
    if method not in ("GET", "HEAD") or "/resolve/" not in path:
        return False
    parts = path.strip("/").split("/")
    repo_type = "model"
    if parts[0] in ("datasets", "spaces"):
        repo_type, parts = REPO_TYPES[parts[0]], parts[1:]
    if len(parts) < 5 or parts[2] != "resolve":
        return False
    repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
    revision, filename = unquote(parts[3]), unquote("/".join(parts[4:]))
    hub = h.hub
    with hub._lock:
        repo = h._repo(repo_type, repo_id)
        commit = h._commit(repo, revision)
        entry = commit.files.get(filename)
        lfs_data = hub.lfs_objects.get(entry.lfs_sha256) if entry is not None and entry.lfs_sha256 else None
    headers = {"X-Repo-Commit": commit.oid}
    if entry is None:
        raise HubError(404, "Entry not found", "EntryNotFound", extra={"_headers": headers})
    headers["ETag"] = f'"{entry.blob_id}"'
    if entry.lfs_sha256 is None:
        return _send_content(h, entry.content, headers)
    # LFS: like the Hub, redirect to the storage host; the linked etag/size describe the real content.
    headers.update(
        {"X-Linked-Etag": f'"{entry.lfs_sha256}"', "X-Linked-Size": str(len(lfs_data)),
         "Location": f"{hub.storage_endpoint}/_lfs/objects/{entry.lfs_sha256}"}
    )  # fmt: skip
    return h._send(302, b"", headers)


_ROUTES = (route_misc, route_lfs, route_api_repo, route_resolve)


# ---------------------------------------------------------------------- client configuration and fixture


def configure_hf_client(monkeypatch, endpoint: str, token: str, hf_home: Path) -> None:
    """Point huggingface_hub (and transformers) in THIS process and in subprocesses at `endpoint`.

    Sets `HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_DISABLE_XET=1`, `HF_HUB_DISABLE_TELEMETRY=1`
    and unsets `HF_HUB_OFFLINE`; patches the values huggingface_hub computed from them at import time
    (`huggingface_hub.constants.*`, `huggingface_hub.hf_api.api`, the Hub-origin allow list) and drops transformers'
    cached `HfApi`. Everything is undone by `monkeypatch` at teardown.
    """
    from urllib.parse import urlsplit as _split

    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    hf_home = Path(hf_home)
    hub_cache, assets_cache = hf_home / "hub", hf_home / "assets"
    env = {
        "HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets_cache), "HF_XET_CACHE": str(hf_home / "xet"), "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE",
                "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)

    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {_split(endpoint).hostname}),
        "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hub_cache), "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets_cache), "HUGGINGFACE_ASSETS_CACHE": str(assets_cache),
        "HF_TOKEN_PATH": str(hf_home / "token"), "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_XET_CACHE": str(hf_home / "xet"), "HF_HUB_DISABLE_XET": True, "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }  # fmt: skip
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    origin = f"{_split(endpoint).scheme}://{_split(endpoint).netloc}"
    monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {origin}))
    try:
        import transformers.utils.hub as tf_hub

        monkeypatch.setattr(tf_hub, "_hf_api", None)
    except ImportError:
        pass


def set_offline(monkeypatch, offline: bool = True) -> None:
    """Turn huggingface_hub's offline mode on (or off) in this process and in subprocesses."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


try:
    import pytest
except ImportError:  # the server itself does not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def local_hub(tmp_path, monkeypatch) -> Iterator[LocalHub]:
        """A started `LocalHub`, with huggingface_hub/transformers pointed at it, a token and a fresh HF_HOME."""
        hub = LocalHub().start()
        configure_hf_client(monkeypatch, hub.endpoint, hub.token, tmp_path / "hf_home")
        try:
            yield hub
        finally:
            hub.stop()


__all__ = ["LocalHub", "StoredFile", "configure_hf_client", "set_offline", "local_hub", "git_blob_id"]
