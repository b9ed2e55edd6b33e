"""The loopback hub itself: it records requests and misbehaves only when told to."""

from __future__ import annotations

import hashlib
import http.client
import json
import urllib.error
import urllib.request

import pytest

from gcupipe.testing.loopback_hub import LoopbackHub, git_blob_sha1


def _get(url: str, token: str | None = None) -> bytes:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read()


def test_listings_files_and_knobs():
    with LoopbackHub() as hub:
        repo = hub.add_repo("org/m", {"config.json": b"{}", "w.safetensors": b"0123456789"})
        listing = json.loads(_get(f"{hub.url}/api/v1/models/org/m/repo/files?Revision=master"))
        sizes = {f["Path"]: (f["Size"], f["Sha256"]) for f in listing["Data"]["Files"]}
        assert sizes["w.safetensors"] == (10, hashlib.sha256(b"0123456789").hexdigest())
        tree = json.loads(_get(f"{hub.url}/api/models/org/m/tree/{repo.commit}?recursive=true"))
        by_path = {entry["path"]: entry for entry in tree}
        assert by_path["config.json"]["oid"] == git_blob_sha1(b"{}")
        assert "lfs" in by_path["w.safetensors"]
        assert _get(f"{hub.url}/org/m/resolve/main/w.safetensors") == b"0123456789"
        assert len(hub.file_requests()) == 1 and len(hub.requests) == 3

        hub.corrupt.add("w.safetensors")
        assert _get(f"{hub.url}/org/m/resolve/main/w.safetensors") != b"0123456789"
        hub.corrupt.clear()

        hub.drop_once.add("w.safetensors")
        with pytest.raises(http.client.IncompleteRead):
            _get(f"{hub.url}/api/v1/models/org/m/repo?Revision=master&FilePath=w.safetensors")
        assert _get(f"{hub.url}/org/m/resolve/main/w.safetensors") == b"0123456789"

        for url in (
            f"{hub.url}/api/models/org/none/revision/main",
            f"{hub.url}/api/models/org/m/revision/nobranch",
        ):
            with pytest.raises(urllib.error.HTTPError) as err:
                _get(url)
            assert err.value.code == 404
        hub.token = "t"
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(f"{hub.url}/org/m/resolve/main/config.json")
        assert err.value.code == 401
        assert _get(f"{hub.url}/org/m/resolve/main/config.json", token="t") == b"{}"
