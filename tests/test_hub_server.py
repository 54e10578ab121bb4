"""The local Hub server: push with huggingface_hub/transformers, load back with from_pretrained, cache offline."""

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from huggingface_hub import HfApi, constants, create_repo, hf_hub_download, snapshot_download, upload_folder
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hub_server import LocalHub, configure_hf_client, set_offline


def _tiny_vit_config() -> ViTConfig:
    return ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3,
    )  # fmt: skip


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return ViTForImageClassification(_tiny_vit_config()).eval()


@pytest.fixture
def pixel_values():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_fixture_points_huggingface_hub_at_the_local_server(local_hub):
    assert constants.ENDPOINT == local_hub.endpoint
    assert os.environ["HF_ENDPOINT"] == local_hub.endpoint
    assert constants.HF_HUB_DISABLE_XET and not constants.HF_HUB_OFFLINE
    assert HfApi().whoami()["name"] == local_hub.user
    assert local_hub.requests == [("GET", "/api/whoami-v2")]


def test_fixture_is_undone_afterwards(tmp_path):
    before = (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_DISABLE_XET, os.environ.get("HF_ENDPOINT"))
    mp = pytest.MonkeyPatch()
    with LocalHub() as hub:
        configure_hf_client(mp, hub.endpoint, hub.token, tmp_path)
        assert constants.ENDPOINT == hub.endpoint
        mp.undo()
    after = (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_DISABLE_XET, os.environ.get("HF_ENDPOINT"))
    assert after == before


def test_upload_folder_then_from_pretrained_gives_identical_outputs(local_hub, tiny_vit, pixel_values, tmp_path):
    folder = tmp_path / "tiny-vit"
    tiny_vit.save_pretrained(folder)

    url = create_repo("org/tiny-vit")
    assert url.repo_id == "org/tiny-vit" and url.startswith(local_hub.endpoint)
    create_repo("org/tiny-vit", exist_ok=True)  # a second create is a no-op with exist_ok
    with pytest.raises(HfHubHTTPError) as exc:
        create_repo("org/tiny-vit")
    assert exc.value.response.status_code == 409

    commit = upload_folder(repo_id="org/tiny-vit", folder_path=folder, commit_message="tiny vit")
    assert commit.oid == HfApi().model_info("org/tiny-vit").sha

    # What the client sent: small JSON inline, safetensors through the LFS batch API to the storage host.
    stored = local_hub.list_files("org/tiny-vit")
    assert set(stored) == {".gitattributes", "config.json", "model.safetensors"}
    assert stored["config.json"].lfs_sha256 is None
    assert local_hub.file_bytes("org/tiny-vit", "config.json") == (folder / "config.json").read_bytes()
    assert stored["model.safetensors"].lfs_sha256 == _sha256(folder / "model.safetensors")
    assert ("POST", "/org/tiny-vit.git/info/lfs/objects/batch") in local_hub.requests
    assert ("POST", "/api/models/org/tiny-vit/commit/main") in local_hub.requests

    n_before = len(local_hub.requests)
    loaded = AutoModelForImageClassification.from_pretrained("org/tiny-vit").eval()
    downloads = local_hub.requests[n_before:]
    assert ("GET", f"/_lfs/objects/{stored['model.safetensors'].lfs_sha256}") in downloads
    assert any(m == "HEAD" and p.endswith("/resolve/" + commit.oid + "/config.json") for m, p in downloads)
    base = AutoModel.from_pretrained("org/tiny-vit").eval()
    assert type(base).__name__ == "ViTModel"
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, tiny_vit(pixel_values).logits, rtol=0, atol=0)
        torch.testing.assert_close(
            base(pixel_values).last_hidden_state, tiny_vit.vit(pixel_values).last_hidden_state, rtol=0, atol=0
        )
    assert local_hub.unhandled == []


def test_push_to_hub_and_snapshot_download(local_hub, tiny_vit, pixel_values, tmp_path):
    commit = tiny_vit.push_to_hub("org/x", commit_message="push tiny vit")
    assert commit.oid in commit.commit_url
    files = HfApi().list_repo_files("org/x")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)

    snapshot = snapshot_download("org/x")
    assert sorted(p.name for p in (tmp_path / "hf_home" / "hub").glob("models--org--x/snapshots/*/*")) == sorted(files)
    for name in files:
        assert open(os.path.join(snapshot, name), "rb").read() == local_hub.file_bytes("org/x", name)
    reloaded = ViTForImageClassification.from_pretrained(snapshot).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values).logits, tiny_vit(pixel_values).logits)

    # A second push of changed weights makes a new commit that from_pretrained picks up.
    with torch.no_grad():
        tiny_vit.classifier.bias.add_(1.0)
    tiny_vit.push_to_hub("org/x")
    again = AutoModelForImageClassification.from_pretrained("org/x").eval()
    with torch.no_grad():
        assert torch.equal(again(pixel_values).logits, tiny_vit(pixel_values).logits)
    assert len(HfApi().list_repo_commits("org/x")) == 3  # initial, first push, second push


def test_cache_serves_from_pretrained_when_hub_is_stopped_and_offline(local_hub, tiny_vit, pixel_values, monkeypatch):
    tiny_vit.push_to_hub("org/cached")
    online = AutoModelForImageClassification.from_pretrained("org/cached").eval()
    local_hub.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", local_hub.port), timeout=2).close()

    set_offline(monkeypatch)
    n_requests = len(local_hub.requests)
    offline = AutoModelForImageClassification.from_pretrained("org/cached").eval()
    assert len(local_hub.requests) == n_requests
    with torch.no_grad():
        assert torch.equal(offline(pixel_values).logits, online(pixel_values).logits)
    with pytest.raises(OSError):  # never pushed, not cached
        AutoModelForImageClassification.from_pretrained("org/never-pushed")


def test_errors_are_the_hub_errors(local_hub, tmp_path):
    create_repo("org/errs")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/errs", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/errs", ".gitattributes", revision="nope")
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(token="hf_wrong").upload_file(
            path_or_fileobj=tmp_path / "a.txt", path_in_repo="a.txt", repo_id="org/errs"
        )
    assert exc.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as exc:
        create_repo("someone-else/repo")
    assert exc.value.response.status_code == 403
    # A commit naming an LFS object that was never uploaded is refused.
    import httpx2

    body = json.dumps({"key": "header", "value": {"summary": "x"}}) + "\n"
    body += json.dumps({"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64, "size": 1}})
    r = httpx2.post(
        f"{local_hub.endpoint}/api/models/org/errs/commit/main", content=body.encode(),
        headers={"Authorization": f"Bearer {local_hub.token}", "Content-Type": "application/x-ndjson"},
    )  # fmt: skip
    assert r.status_code == 400 and "never uploaded" in r.json()["error"]


def test_subprocess_sees_the_local_hub(local_hub, tmp_path):
    (tmp_path / "hello.txt").write_text("hello from the local hub")
    create_repo("org/sub")
    HfApi().upload_file(path_or_fileobj=tmp_path / "hello.txt", path_in_repo="hello.txt", repo_id="org/sub")
    code = "from huggingface_hub import hf_hub_download; print(open(hf_hub_download('org/sub', 'hello.txt')).read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello from the local hub"
    assert ("GET", "/org/sub/resolve/main/hello.txt") in local_hub.requests
