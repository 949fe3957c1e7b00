"""safetensors files with a JSON metadata record: the one file format for guards and models, so
nothing the project saves is ever unpickled on load.

A guard file decides what the defense lets through, so it must not be possible to corrupt or edit
it silently. :func:`write` stores, next to the JSON record ``meta[kind]``:

* ``<kind>.sha256``: a SHA-256 digest over ``kind``, the stored JSON and every tensor's name,
  dtype, shape and bytes (and the HMAC below, if any). It catches accidental corruption
  (truncation, flipped bytes, a half-copied file) and hand edits that forget to update it. It
  does *not* stop a deliberate attacker, who can recompute it.
* ``<kind>.hmac-sha256`` (only with ``key``): an HMAC-SHA256 over the same content. Only someone
  holding the key can produce it, so ``read(..., key=...)`` refuses files someone else changed.

:func:`read` checks all of that before returning anything; the values it returns are exactly the
values it verified. It only ever runs the safetensors and json parsers on the file (no pickle, no
code from the file). Files written before the digest existed (metadata holds only ``kind``) are
read with a :class:`LegacyFileWarning` when no key is given, so old models and guards keep
loading; with a key, or with ``allow_legacy=False``, they are refused.

:func:`check_tensor_ranges` and :func:`check_shapes` are the value and shape checks a loader runs
after :func:`read`: a well-formed, correctly signed file can still hold values the guard must not
trust.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import tempfile
import json
import re
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

__all__ = ["GuardFileError", "LegacyFileWarning", "write", "read", "check_tensor_ranges",
           "check_shapes"]

DIGEST_SUFFIX = ".sha256"
HMAC_SUFFIX = ".hmac-sha256"
_DOMAIN = b"linkbreaker-safefiles-v1\0"
_HEX64 = re.compile(r"[0-9a-f]{64}")

Key = Union[bytes, str, None]


class GuardFileError(ValueError):
    """A guard or model file that must not be used: corrupted, edited, unsigned or out of range.

    A ``ValueError`` so existing ``except ValueError`` callers keep working; the message names the
    file and the problem."""


class LegacyFileWarning(UserWarning):
    """A file written before content digests existed: it loads, but nothing was verified."""


# ---------------------------------------------------------------------------------- helpers

def _key_bytes(key: Key) -> Optional[bytes]:
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"key must be bytes or str, got {type(key).__name__}")
    if not key:
        raise ValueError("key must not be empty (an empty HMAC key protects nothing)")
    return bytes(key)


def _canonical(meta) -> str:
    """One JSON spelling per value, so the stored text and the digest input never disagree."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # raw little-endian bytes, the same ones safetensors stores (works for bf16 and bool too)
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _content_hashes(kind: str, meta_json: str, tensors: Mapping[str, torch.Tensor],
                    key: Optional[bytes], mac_hex: Optional[str] = None) -> Tuple[str, str]:
    """``(digest_hex, mac_hex)``. The digest also covers the stored MAC (``mac_hex``; computed
    when ``None``), so a flipped byte in the MAC is caught even when no key is given."""
    sha = hashlib.sha256()
    mac = hmac.new(key, digestmod=hashlib.sha256) if key is not None else None

    def feed(data: bytes) -> None:
        chunk = len(data).to_bytes(8, "little") + data  # length-prefixed: no ambiguous splits
        sha.update(chunk)
        if mac is not None:
            mac.update(chunk)

    sha.update(_DOMAIN)
    if mac is not None:
        mac.update(_DOMAIN)
    feed(kind.encode("utf-8"))
    feed(meta_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        feed(json.dumps([name, str(t.dtype), list(t.shape)]).encode("utf-8"))
        feed(_tensor_bytes(t))
    if mac_hex is None:
        mac_hex = mac.hexdigest() if mac is not None else ""
    sha.update(b"hmac\0" + mac_hex.encode("ascii"))
    return sha.hexdigest(), mac_hex


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate JSON key {sorted(k for k in keys if keys.count(k) > 1)[0]!r}")
    return dict(pairs)


def _header(data: bytes) -> dict:
    """The safetensors JSON header, parsed strictly. safetensors itself accepts any JSON
    whitespace, so a flipped padding byte (space -> tab/newline) would otherwise go unnoticed:
    the writer emits compact JSON padded with spaces, so tabs, newlines and CRs are refused."""
    n = int.from_bytes(data[:8], "little")
    raw = data[8:8 + n]
    if any(c in raw for c in b"\t\n\r"):
        raise ValueError("header contains whitespace the writer never emits")
    if not raw.rstrip(b" ").endswith(b"}"):
        raise ValueError("header is not one JSON object")
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


# ------------------------------------------------------------------------------ write / read

def write(path, tensors: Mapping[str, torch.Tensor], kind: str, meta: dict, key: Key = None) -> Path:
    """Write ``tensors`` and the JSON record ``meta`` (under the metadata entry ``kind``) with a
    content digest, and with an HMAC-SHA256 when ``key`` (bytes or str) is given. Atomically: the
    file is written beside ``path`` and renamed over it, so a reader (another process, or the next
    run after a crash) sees the old file or the new one, never half of one. New files are readable
    by their owner only (the temporary file's mode)."""
    from safetensors.torch import save_file

    key = _key_bytes(key)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_json = _canonical(meta)
    digest, mac = _content_hashes(kind, meta_json, tensors, key)
    metadata = {kind: meta_json, kind + DIGEST_SUFFIX: digest}
    if key is not None:
        metadata[kind + HMAC_SUFFIX] = mac
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read(path, kind: str, what: str = "linkbreaker", short: str = "file", *, key: Key = None,
         allow_legacy: bool = True) -> Tuple[Dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` from :func:`write`'s file, verified.

    ``what`` names the kind of file in messages ("LinkBreaker guard"), ``short`` the missing-file
    message ("guard"). Raises ``FileNotFoundError`` for a missing path and :class:`GuardFileError`
    for anything else wrong: not safetensors, truncated, not a ``what`` file, digest mismatch,
    missing or wrong HMAC (when ``key`` is given), an unsigned legacy file when ``key`` is given
    or ``allow_legacy`` is False."""
    from safetensors.torch import load as load_bytes

    key = _key_bytes(key)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {short} file at {path}")

    def refuse(problem: str):
        return GuardFileError(f"{path}: {problem}")

    try:
        data = path.read_bytes()  # read once: what is checked is what is returned
    except OSError as e:
        raise refuse(f"cannot read the file ({e})") from None
    try:
        tensors = load_bytes(data)  # validates offsets, sizes, dtypes; refuses truncated files
        header = _header(data)
    except Exception as e:  # safetensors' parser errors are not one public class
        raise GuardFileError(f"{path} is damaged or not a {what} file (not valid safetensors: "
                             f"{e})") from None

    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise refuse("safetensors metadata is not a string-to-string map")
    if kind not in metadata:
        raise GuardFileError(f"{path} is a safetensors file but not a {what} file "
                             f"(no '{kind}' metadata record)")
    extra = sorted(set(metadata) - {kind, kind + DIGEST_SUFFIX, kind + HMAC_SUFFIX})
    if extra:
        raise refuse(f"unexpected metadata entries {extra} (the file was edited or is damaged)")
    meta_json = metadata[kind]
    try:
        meta = json.loads(meta_json, object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise refuse(f"the '{kind}' metadata record is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise refuse(f"the '{kind}' metadata record is not a JSON object")

    digest = metadata.get(kind + DIGEST_SUFFIX)
    mac = metadata.get(kind + HMAC_SUFFIX)
    if digest is None:
        if mac is not None:
            raise refuse("has an HMAC but no content digest (the file was edited)")
        if key is not None:
            raise refuse("carries no content digest or HMAC signature, but a key was given: "
                         "refusing an unsigned file (re-save it with the key)")
        if not allow_legacy:
            raise refuse("carries no content digest (written by an older version or stripped); "
                         "re-save it to add one")
        warnings.warn(f"{path} carries no content digest (written before linkbreaker-ext stored "
                      f"one): loaded without any integrity check; re-save it to add one",
                      LegacyFileWarning, stacklevel=2)
        return tensors, meta

    if not _HEX64.fullmatch(digest) or (mac is not None and not _HEX64.fullmatch(mac)):
        raise refuse("the stored digest or HMAC is malformed (the file is damaged or was edited)")
    expected, _ = _content_hashes(kind, meta_json, tensors, None, mac_hex=mac or "")
    if not hmac.compare_digest(expected, digest):
        raise refuse("content digest mismatch: the file is corrupted or was edited after it "
                     "was written")
    if key is not None:
        if mac is None:
            raise refuse("carries no HMAC signature, but a key was given: refusing an unsigned "
                         "file")
        _, want = _content_hashes(kind, meta_json, tensors, key)
        if not hmac.compare_digest(want, mac):
            raise refuse("HMAC signature does not match the key: the file was changed by someone "
                         "without the key, or signed with a different key")
    return tensors, meta


# --------------------------------------------------------------------------- value checks

def _rule(name: str) -> Optional[str]:
    """Which range rule a tensor name falls under, from the part before the first ``.`` (what
    follows is a layer name, which may say anything): a ``_``-separated word of it starting with
    ``mask`` (``masks.relu1``, ``early_masks``), ``fill`` or ``threshold``."""
    for word in name.split(".")[0].lower().split("_"):
        for rule in ("mask", "fill", "threshold"):
            if word.startswith(rule):
                return rule
    return None


def check_tensor_ranges(tensors: Mapping[str, torch.Tensor], source=None) -> None:
    """Refuse values the guard must not trust, even from a correctly signed file: masks
    (``masks.<layer>``, ``early_masks``) finite and in [0, 1], fills (``fill.<layer>``) finite,
    ``thresholds`` finite and in (0, 1], and no NaN/Inf in any other floating tensor. ``source`` (the path)
    prefixes the messages. Raises :class:`GuardFileError`."""
    where = f"{source}: " if source is not None else ""
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise GuardFileError(f"{where}{name} is a {type(t).__name__}, not a tensor")
        rule = _rule(name)
        floating = t.is_floating_point() or t.is_complex()
        if rule is not None and not t.is_floating_point():
            raise GuardFileError(f"{where}{name} must be a floating-point tensor, got {t.dtype}")
        if not floating or t.numel() == 0:
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            raise GuardFileError(f"{where}{name} contains {int(bad.sum())} NaN/Inf value(s) "
                                 f"(shape {list(t.shape)})")
        if rule == "mask" and not bool(((t >= 0) & (t <= 1)).all()):
            raise GuardFileError(f"{where}{name} must have all values in [0, 1], found values in "
                                 f"[{t.min().item():g}, {t.max().item():g}]")
        if rule == "threshold" and not bool(((t > 0) & (t <= 1)).all()):
            raise GuardFileError(f"{where}{name} must have all values in (0, 1], found values in "
                                 f"[{t.min().item():g}, {t.max().item():g}]")


def check_shapes(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple],
                 source=None) -> Dict[str, int]:
    """Refuse a file whose tensors are not exactly ``expected`` (name -> shape). A dimension is an
    int (must match), ``None`` (anything) or a str symbol that must take the same value
    everywhere (``{"masks": ("N", 16), "thresholds": ("N",)}``). Returns the symbols' values."""
    where = f"{source}: " if source is not None else ""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise GuardFileError(f"{where}missing tensor(s) {missing}")
    if extra:
        raise GuardFileError(f"{where}unexpected tensor(s) {extra}")
    bound: Dict[str, int] = {}
    for name in sorted(expected):
        want, got = tuple(expected[name]), tuple(tensors[name].shape)
        ok = len(want) == len(got)
        for w, g in zip(want, got) if ok else ():
            if isinstance(w, str):
                ok = bound.setdefault(w, g) == g
            elif w is not None:
                ok = w == g
            if not ok:
                break
        if not ok:
            shown = ", ".join(f"{w}={bound[w]}" if isinstance(w, str) and w in bound
                              else "*" if w is None else str(w) for w in want)
            raise GuardFileError(f"{where}{name} has shape {list(got)}, expected [{shown}]")
    return bound
