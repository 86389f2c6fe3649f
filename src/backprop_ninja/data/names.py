"""The default data set: names.txt of the makemore repository, found or downloaded once.

    $BACKPROP_NINJA_DATA/names.txt  ->  the user cache  ->  a download verified by its sha256
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from backprop_ninja.errors import UserError
from backprop_ninja.files import atomic_write

NAMES_FILE = "names.txt"
NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
DATA_ENV = "BACKPROP_NINJA_DATA"  # a folder that holds names.txt
URL_ENV = "BACKPROP_NINJA_DATA_URL"  # where to download it from (tests point it at 127.0.0.1)
DOWNLOAD_TIMEOUT_S = 30



def cache_dir() -> Path:
    """The user cache directory, e.g. ~/.cache/backprop-ninja on Linux."""
    from platformdirs import user_cache_path

    return user_cache_path("backprop-ninja")


def resolve_names() -> Path:
    """Find names.txt: $BACKPROP_NINJA_DATA, then the user cache, then one verified download."""
    env_dir = os.environ.get(DATA_ENV)
    if env_dir:
        candidate = Path(env_dir) / NAMES_FILE
        if candidate.is_file():
            return candidate
    cached = cache_dir() / NAMES_FILE
    if cached.is_file() and _sha256(cached) == NAMES_SHA256:
        return cached
    return download_names(cached)


def download_names(dest: Path, url: str | None = None) -> Path:
    """Download names.txt to `dest` once, verify its sha256, and move it in place atomically."""
    url = url or os.environ.get(URL_ENV) or NAMES_URL
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"cannot download the names data set from {url} ({reason}); "
            f"offline? pass a word list with --input FILE, or set {DATA_ENV} to a folder holding {NAMES_FILE}"
        ) from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != NAMES_SHA256:
        raise UserError(
            f"downloaded {url} but its sha256 is {digest}, expected {NAMES_SHA256}; refusing to use it"
        )
    atomic_write(dest, payload)
    return dest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
