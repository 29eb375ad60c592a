"""A checksummed container of tensors and plain data that cannot run code when read (docs/SECURITY.md).

A file is one ASCII line, ``<kind> sha256=<64 hex digits>\\n``, followed by a safetensors payload (the
``safetensors`` format: an 8-byte header length, a JSON header, raw tensor bytes; no unpickler). The digest is
the SHA-256 of every byte after that line (``tail -n +2 FILE | sha256sum``) and is checked before any of it is
parsed: a truncated, cut or altered file is refused before anything is deserialised.

The plain data (dicts, lists, tuples, str, int, float incl. NaN/inf, bool, None, numpy arrays and scalars,
tensors) is stored as one JSON document ``{"format": kind, "data": ...}`` in the safetensors metadata (its
only key, ``fod``: the same values always give the same bytes); each tensor or numpy array
in it is a reference ``{"__tensor__": name}`` / ``{"__ndarray__": name, "dtype": ..., "shape": ...}`` to a
tensor of the payload; tuples are ``{"__tuple__": [...]}``, dicts with keys other than strings
``{"__dict__": [[key, value], ...]}``, non-finite floats ``{"__float__": "nan"}``. Numpy scalars are stored as
Python numbers. Anything else is refused when writing (TypeError), not silently converted.
"""
from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import torch

MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__")
_HEADER = re.compile(rb"([a-z0-9][a-z0-9.-]{0,63}) sha256=([0-9a-f]{64})\n")
HEADER_MAX = 100  # bytes: the first line is never longer


class FormatError(ValueError):
    """The bytes are not a whole, undamaged container (the message says why, without the file name)."""


def _encode(obj, tensors: dict, where: str):
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"{where}: a numpy array of Python objects cannot be stored")
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.frombuffer(np.ascontiguousarray(obj).tobytes(), np.uint8).copy())
        return {"__ndarray__": name, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors, where)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(x, tensors, f"{where}[{i}]") for i, x in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(x, tensors, f"{where}[{i}]") for i, x in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in MARKERS):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                             for k, v in obj.items()]}
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored (only tensors, numpy arrays and plain data)")


def _decode(val, tensors: dict):
    if isinstance(val, list):
        return [_decode(x, tensors) for x in val]
    if not isinstance(val, dict):
        return val
    if len(val) == 1 and "__tensor__" in val:
        return tensors[val["__tensor__"]]
    if "__ndarray__" in val and set(val) == {"__ndarray__", "dtype", "shape"}:
        dtype = np.dtype(val["dtype"])
        if dtype.hasobject:
            raise FormatError("it declares a numpy array of Python objects")
        raw = tensors[val["__ndarray__"]].numpy().tobytes()
        return np.frombuffer(raw, dtype=dtype).reshape([int(n) for n in val["shape"]]).copy()
    if len(val) == 1 and "__tuple__" in val:
        return tuple(_decode(x, tensors) for x in val["__tuple__"])
    if len(val) == 1 and "__dict__" in val:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in val["__dict__"]}
    if len(val) == 1 and "__float__" in val:
        if val["__float__"] not in ("nan", "inf", "-inf"):
            raise FormatError(f"it holds a float {val['__float__']!r}")
        return float(val["__float__"])
    return {k: _decode(v, tensors) for k, v in val.items()}


def dumps(kind: str, data) -> bytes:
    """The file's bytes for ``data`` (see the module doc); ``kind``: the first word of its first line."""
    from safetensors.torch import save
    tensors: dict = {}
    doc = json.dumps({"format": kind, "data": _encode(data, tensors, "data")}, allow_nan=False,
                     separators=(",", ":"))
    payload = save(tensors, metadata={"fod": doc})  # one key: safetensors orders several at random
    head = f"{kind} sha256={hashlib.sha256(payload).hexdigest()}\n".encode("ascii")
    assert _HEADER.fullmatch(head), kind
    return head + payload


def header(raw: bytes):
    """(kind, digest) of the first line, or None if ``raw`` does not start with one."""
    m = _HEADER.match(raw[:HEADER_MAX])
    return (m.group(1).decode(), m.group(2).decode()) if m else None


def loads(raw: bytes, kind: str):
    """The data of a file's bytes, after checking its first line names ``kind`` and its checksum matches.
    Raises FormatError (why, in words) for anything else; nothing is parsed before the checksum matched."""
    head = header(raw)
    if head is None:
        raise FormatError(f"its first line is not '{kind} sha256=<digest>'")
    if head[0] != kind:
        raise FormatError(f"it is a {head[0]!r} file, not {kind!r}")
    payload = raw[raw.index(b"\n") + 1:]
    if hashlib.sha256(payload).hexdigest() != head[1]:
        raise FormatError("its content does not match its SHA-256 checksum (the file is truncated or altered)")
    from safetensors.torch import load
    try:
        n = int.from_bytes(payload[:8], "little")
        doc = json.loads(json.loads(payload[8:8 + n])["__metadata__"]["fod"])
        if doc.get("format") != kind:
            raise FormatError(f"its payload is not a {kind!r}")
        return _decode(doc["data"], load(bytes(payload)))
    except FormatError:
        raise
    except Exception as exc:  # a consistent checksum over inconsistent content: a file written by other code
        raise FormatError(f"its content is inconsistent ({type(exc).__name__}: {str(exc)[:200]})") from None
