"""safetensors files with a JSON metadata record: the one file format for guards and models, so
nothing the project saves is ever unpickled on load."""
from __future__ import annotations

import json
from pathlib import Path


def write(path, tensors: dict, key: str, meta: dict) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata={key: json.dumps(meta)})
    return path


def read(path, key: str, what: str, short: str):
    """``(tensors, meta)``; clear errors for a missing path, a file that is not safetensors and a
    safetensors file without our ``key`` record (``what`` names the kind of file in messages)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {short} file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(key)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a {what} file (not safetensors: {e})") from None
    if meta is None:
        raise ValueError(f"{path} is a safetensors file but not a {what} file")
    return tensors, json.loads(meta)
