"""The standard FID Inception: its weights fetched once from a real loopback HTTP server, verified,
cached atomically, and read without running pickled code; nothing here touches the internet."""

import hashlib
import http.server
import socket
import threading

import pytest
import torch

from rayganx.evaluation import inception
from rayganx.evaluation import extractors as ex
from rayganx.evaluation import metrics as m
from rayganx.job.sections import EvalSpec

STAND_IN = b"stand-in for the Inception weights " * 4096  # 140 kB: the download path, not the network


class _Server:
    """http.server on 127.0.0.1 in a thread: path -> bytes, with every request counted."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()  # paths that announce their full length but send half
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if self.path in server.truncate else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh per-user cache, and no weights path from the environment running the tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("RAYGANX_INCEPTION_PATH", raising=False)
    return tmp_path / "xdg" / "rayganx"


def serve(server, monkeypatch, body: bytes, pinned: bytes = None, path="/pt_inception.pth") -> str:
    """Point the download at the loopback server and pin the stand-in's checksum."""
    server.files[path] = body
    sha = hashlib.sha256(pinned if pinned is not None else body).hexdigest()
    monkeypatch.setenv("RAYGANX_INCEPTION_URL", server.url(path))
    monkeypatch.setenv("RAYGANX_INCEPTION_SHA256", sha)
    return sha


def leftovers(cache):
    return sorted(p.name for p in cache.iterdir() if p.name != ".inception.lock") if cache.exists() else []


def test_the_pinned_artifact_is_the_published_state_dict():
    # The torch.hub convention: the name ends with the first 8 hex digits of the file's SHA-256.
    assert inception.URL.endswith(f"/pt_inception-2015-12-05-{inception.SHA256[:8]}.pth")
    assert len(inception.SHA256) == 64 and int(inception.SHA256, 16)


def test_download_once_verified_then_reused_from_the_cache(server, cache, monkeypatch):
    sha = serve(server, monkeypatch, STAND_IN)
    assert inception.weights() == STAND_IN
    assert len(server.requests) == 1
    assert leftovers(cache) == [f"pt_inception-2015-12-05-{sha[:8]}.pth"]  # no temporary file left
    assert inception.weights() == STAND_IN
    assert len(server.requests) == 1  # the second call makes no request


def test_checksum_mismatch_is_one_line_and_keeps_nothing(server, cache, monkeypatch):
    serve(server, monkeypatch, b"something else entirely", pinned=STAND_IN)
    with pytest.raises(inception.InceptionError) as e:
        inception.weights()
    msg = str(e.value)
    assert "\n" not in msg and "SHA-256" in msg and msg.endswith("removed it"), msg
    assert leftovers(cache) == []


def test_a_cut_off_download_is_never_taken_for_the_file(server, cache, monkeypatch):
    serve(server, monkeypatch, STAND_IN)
    server.truncate.add("/pt_inception.pth")
    with pytest.raises(inception.InceptionError) as e:
        inception.weights()
    assert "\n" not in str(e.value) and "stopped after 71680 of 143360 bytes" in str(e.value), str(e.value)
    assert leftovers(cache) == []
    server.truncate.clear()
    assert inception.weights() == STAND_IN  # the next try starts over and completes


def test_offline_is_one_clear_line(cache, monkeypatch):
    with socket.socket() as s:  # a port with nothing listening: a refused connection, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAYGANX_INCEPTION_URL", f"http://127.0.0.1:{port}/pt_inception.pth")
    with pytest.raises(inception.InceptionError) as e:
        inception.weights()
    msg = str(e.value)
    assert "\n" not in msg and "cannot download" in msg and "offline?" in msg and "eval.inception_path" in msg, msg
    assert leftovers(cache) == []


def test_http_error_is_one_line(server, cache, monkeypatch):
    monkeypatch.setenv("RAYGANX_INCEPTION_URL", server.url("/missing.pth"))
    with pytest.raises(inception.InceptionError, match=r"cannot download .*HTTPError.*Not Found") as e:
        inception.weights()
    assert "\n" not in str(e.value)


def test_credentials_in_the_variables_are_refused_and_never_printed(cache, monkeypatch):
    for var in ("RAYGANX_INCEPTION_URL", "RAYGANX_INCEPTION_PATH"):
        monkeypatch.setenv(var, "https://mirror-user:s3cr3t-pw@127.0.0.1:9/pt_inception.pth")
        with pytest.raises(inception.InceptionError, match=f"{var}: the URL carries credentials") as e:
            inception.weights()
        assert "s3cr3t-pw" not in str(e.value)
        monkeypatch.delenv(var)


def test_a_damaged_cached_file_is_replaced(server, cache, monkeypatch, caplog):
    sha = serve(server, monkeypatch, STAND_IN)
    cache.mkdir(parents=True)
    (cache / f"pt_inception-2015-12-05-{sha[:8]}.pth").write_bytes(STAND_IN[:100])
    assert inception.weights() == STAND_IN
    assert len(server.requests) == 1
    assert "does not match its SHA-256" in caplog.text


def test_a_given_path_is_verified_and_never_removed(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("RAYGANX_INCEPTION_URL", "http://127.0.0.1:9/never-used")
    given = tmp_path / "weights.pth"
    given.write_bytes(b"not the weights")
    with pytest.raises(inception.InceptionError, match=r"eval.inception_path: .* has SHA-256 \w+, expected "
                                                       + inception.SHA256):
        inception.weights(str(given))
    assert given.exists()
    monkeypatch.setenv("RAYGANX_INCEPTION_PATH", str(tmp_path / "nope.pth"))
    with pytest.raises(inception.InceptionError, match="eval.inception_path: .*nope.pth does not exist"):
        inception.weights()
    monkeypatch.setenv("RAYGANX_INCEPTION_SHA256", hashlib.sha256(b"not the weights").hexdigest())
    assert inception.weights(str(given)) == b"not the weights"  # eval.inception_path wins over the variable


def test_tf1_resize_samples_without_the_half_pixel_shift():
    x = torch.tensor([[[[0.0, 10.0]]]])
    assert inception.tf1_resize(x, 4)[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]  # torch's: 0, 2.5, 7.5, 10
    y = torch.rand(1, 3, 7, 7)
    assert torch.equal(inception.tf1_resize(y, 7), y)


class _Payload:
    """A pickle that runs code when loaded without weights_only: it must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def stand_in_weights(tmp_path_factory):
    """A state dict of the architecture, seeded: stands in for the 91 MB published file."""
    torch.manual_seed(0)
    net = inception.FIDInceptionV3()
    path = tmp_path_factory.mktemp("inception") / "stand_in.pth"
    torch.save(net.state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_inception_features_and_logits_from_a_given_file(stand_in_weights, cache, monkeypatch):
    path, sha = stand_in_weights
    monkeypatch.setenv("RAYGANX_INCEPTION_SHA256", sha)
    ext = ex.load_extractor(EvalSpec(features="inception", inception_path=str(path)), channels=1)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    feats, logits = m.features_of(ext, x)
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008) and torch.isfinite(feats).all()
    weight = torch.load(path, weights_only=True)["fc.weight"]
    assert torch.allclose(logits, feats @ weight.T, atol=1e-4)  # Inception Score's unbiased logits
    gray = ext(x)
    assert torch.allclose(gray, ext(x.repeat(1, 3, 1, 1)))  # one channel is read as grey RGB
    assert leftovers(cache) == []  # a given file is not copied into the cache


def test_pickled_code_in_a_weights_file_never_runs(tmp_path, cache, monkeypatch):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": _Payload(str(marker))}, evil)  # torch.save's format, with a hostile object inside
    monkeypatch.setenv("RAYGANX_INCEPTION_SHA256", hashlib.sha256(evil.read_bytes()).hexdigest())
    with pytest.raises(m.EvalError, match="the weights do not load into the FID Inception network"):
        ex.load_extractor(EvalSpec(features="inception", inception_path=str(evil)), channels=1)
    assert not marker.exists()

