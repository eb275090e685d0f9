"""The standard FID Inception network, defined here, with its published weights fetched once.

Published FID/KID/IS numbers come from TensorFlow's 2015-12-05 Inception v3 graph. Three ports of
it circulate: NVIDIA's `inception-2015-12-05.pkl` (a pickle) and `.pt` (a TorchScript program),
both of which are code and run when loaded, and the pytorch-fid / torch-fidelity state dict
`pt_inception-2015-12-05-6726825d.pth`, which is tensors only. rayganx uses the state dict:
`torch.load(weights_only=True)` reads it without running anything, into the architecture below
(the TF graph's layers, with its quirks: average pools that ignore padding, a max pool in the
last block, 1008 classes). The bytes are checked against the pinned SHA-256 before they are read.

Where the weights come from, first match wins:
  eval.inception_path, then RAYGANX_INCEPTION_PATH: a local file or URL (s3://...) holding them;
  otherwise <cache>/pt_inception-2015-12-05-6726825d.pth, downloaded once from URL into
  $XDG_CACHE_HOME/rayganx (~/.cache/rayganx without it).
RAYGANX_INCEPTION_URL points the download at a mirror (the checksum still pins the file).
RAYGANX_INCEPTION_SHA256 replaces the pinned checksum: for tests that serve a stand-in file;
scores computed with other weights are not comparable with published ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rayganx.job.errors import UserError

log = logging.getLogger("rayganx.evaluation.inception")

URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
# The full SHA-256 of the published file (95,628,359 bytes; torch-fidelity publishes the same
# bytes as weights-inception-2015-12-05-6726825d.pth). Its first 8 digits are the name's suffix,
# torch.hub's convention, so the name itself cross-checks this value.
SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
SIZE = 299
DOWNLOAD_TIMEOUT_S = 30


class InceptionError(UserError, ValueError):
    """The weights cannot be had or are not the pinned ones; one line."""


# --------------------------------------------------------------------------- where the weights are


def expected_sha256() -> str:
    return os.environ.get("RAYGANX_INCEPTION_SHA256", "").strip().lower() or SHA256


def _no_credentials(name: str, url: str) -> str:
    # They would be written into logs and error lines; mirrors and buckets take them from the
    # environment, as the rest of rayganx does.
    from rayganx.job.sections import URL_CREDENTIALS

    if URL_CREDENTIALS.match(url):
        raise InceptionError(f"{name}: the URL carries credentials (user:password@); remove them and let the "
                             f"environment supply them")
    return url


def weights_url() -> str:
    return _no_credentials("RAYGANX_INCEPTION_URL", os.environ.get("RAYGANX_INCEPTION_URL", "").strip() or URL)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rayganx"


def cache_file(sha256: str) -> Path:
    # Named by the checksum it must have: weights pinned differently never share a file.
    return cache_dir() / f"pt_inception-2015-12-05-{sha256[:8]}.pth"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(url: str, dest: Path, sha256: str) -> None:
    """Fetch url into dest, atomically: the bytes go to a temporary file beside dest and are
    renamed into place only once complete and matching sha256, so a cut-off or wrong download
    is never taken for the file."""
    import http.client
    import urllib.error
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r:
                announced, received = r.headers.get("Content-Length"), 0
                for block in iter(lambda: r.read(1 << 20), b""):
                    digest.update(block)
                    f.write(block)
                    received += len(block)
                f.flush()
                os.fsync(f.fileno())
        # URLError: no route, DNS, refused, HTTP 4xx/5xx; HTTPException: the connection cut mid-file
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise InceptionError(
                f"eval.features inception: cannot download the FID Inception weights from {url} "
                f"({type(e).__name__}: {str(reason).splitlines()[0] if str(reason) else ''}); offline? Fetch "
                f"that file where there is internet and set eval.inception_path or RAYGANX_INCEPTION_PATH"
            ) from None
        # urllib ends a cut-off body quietly: without this it would read as a checksum mismatch.
        if announced and announced.isdigit() and received < int(announced):
            raise InceptionError(f"eval.features inception: the download from {url} stopped after {received} of "
                                 f"{announced} bytes; removed it, try again")
        got = digest.hexdigest()
        if got != sha256:
            raise InceptionError(f"eval.features inception: {url} gave a file with SHA-256 {got}, expected "
                                 f"{sha256}; removed it")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def _cache_lock(directory: Path):
    """Workers sharing a node wait for one download rather than each fetching 90 MB."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".inception.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_weights() -> bytes:
    """The verified bytes of the cached weights, downloaded first when the cache lacks them."""
    sha = expected_sha256()
    dest = cache_file(sha)
    with _cache_lock(dest.parent):
        if dest.exists():
            data = dest.read_bytes()
            if _sha256(data) == sha:
                return data
            log.warning("%s does not match its SHA-256 (damaged?); removed it, downloading it again", dest)
            dest.unlink()
        url = weights_url()
        log.warning("downloading the FID Inception weights (91 MiB) from %s to %s, once", url, dest)
        download(url, dest, sha)
        data = dest.read_bytes()
    # Checked again on the bytes that will be loaded: the file could change after the rename.
    if _sha256(data) != sha:
        raise InceptionError(f"eval.features inception: {dest} changed after it was verified")
    return data


def given_weights(path: str, endpoint_url: str | None = None) -> bytes:
    """The verified bytes of the weights at a path the user named (local or URL)."""
    from rayganx.store.storage import Store

    try:
        data = Store(path, endpoint_url).read_bytes()
    except FileNotFoundError:
        raise InceptionError(f"eval.inception_path: {path} does not exist") from None
    got, sha = _sha256(data), expected_sha256()
    if got != sha:
        raise InceptionError(f"eval.inception_path: {path} has SHA-256 {got}, expected {sha} "
                             f"(pt_inception-2015-12-05-6726825d.pth)")
    return data


def weights(path: str | None = None, endpoint_url: str | None = None) -> bytes:
    if not path and os.environ.get("RAYGANX_INCEPTION_PATH"):
        path = _no_credentials("RAYGANX_INCEPTION_PATH", os.environ["RAYGANX_INCEPTION_PATH"])
    return given_weights(path, endpoint_url) if path else cached_weights()


def load(path: str | None = None, endpoint_url: str | None = None) -> "FIDInceptionV3":
    """The FID Inception network with its verified weights, in eval mode, on the CPU."""
    if expected_sha256() != SHA256:
        log.warning("RAYGANX_INCEPTION_SHA256 is set: these are not the standard FID Inception weights, "
                    "and the scores are not comparable with published ones")
    data = weights(path, endpoint_url)
    net = FIDInceptionV3()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as e:
        raise InceptionError(f"eval.features inception: the weights do not load into the FID Inception network: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------- the network


def tf1_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1.x's resize_bilinear (align_corners=False) does it, the op in
    the FID graph: output pixel i samples input position i * in/out, with no half-pixel shift
    (torch's bilinear shifts by half a pixel, which moves FID)."""

    def axis(n_in: int):
        src = torch.arange(size, device=x.device, dtype=torch.float32) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    y0, y1, wy = axis(x.shape[-2])
    x0, x1, wx = axis(x.shape[-1])
    top, bottom = x[..., y0, :], x[..., y1, :]
    rows = top + (bottom - top) * wy[:, None]
    left, right = rows[..., x0], rows[..., x1]
    return left + (right - left) * wx


class _Conv(nn.Module):
    """Conv without bias, BatchNorm (TF's epsilon), ReLU: the graph's unit."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TF's average pool leaves padding out of the mean (torch's default counts it).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):  # Mixed_5b..5d
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class _BlockB(nn.Module):  # Mixed_6a: 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):  # Mixed_6b..6e: factorised 7x7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _BlockD(nn.Module):  # Mixed_7a: 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):  # Mixed_7b (average pool) and Mixed_7c (max pool, as in the TF graph)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception v3 as in the FID graph. Input: float images with values 0..255 (the uint8 range),
    any size; output: the 2048-d pool features. `logits` gives the 1008 class logits without the
    bias, as the original Inception Score code (and torch-fidelity's `logits_unbiased`) uses them.
    Parameter names follow the published state dict."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280, max_pool=False), _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (tf1_resize(x.float(), SIZE) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))

    def logits(self, pool: torch.Tensor) -> torch.Tensor:
        return pool @ self.fc.weight.T
