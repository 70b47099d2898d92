"""What river makes once and keeps: the cache folder, and files written whole even with two writers at once."""
import os
import secrets
from pathlib import Path

CACHE_ENV = "RIVER_CACHE_DIR"


def cache_dir():
    """Where river keeps what it makes once (the native builds, the converted bundled model, GPTQ's rounding,
    llama.cpp's requantized files): $RIVER_CACHE_DIR, else ~/.cache/river."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "river")


def write_whole(path, write):
    """write(tmp) to a name of this process's own beside `path`, then renamed into place: the file is whole or
    absent, even with two writers at once (what river keeps in its cache folder: GPTQ rounding, requantized GGUFs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
