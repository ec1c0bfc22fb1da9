"""A snapshot's small host state (scheduler, data position, RNG states) as JSON, not pickle.

Shared memory can be written by anything that gets at the segments, so its bytes are decoded
with a format that cannot execute code. JSON plus tags for what it lacks: tensors, numpy
arrays, tuples, bytes and dicts with non-string keys. Floats round-trip exactly.
"""
from __future__ import annotations

import base64
import json

import numpy as np
import torch


def _encode(obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return {"__tensor__": [str(t.dtype).removeprefix("torch."), list(t.shape),
                               base64.b64encode(t.reshape(-1).view(torch.uint8).numpy().tobytes()).decode()]}
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        return {"__ndarray__": [a.dtype.str, list(a.shape), base64.b64encode(a.tobytes()).decode()]}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode()}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v) for k, v in obj.items()}
        return {"__items__": [[_encode(k), _encode(v)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"snapshot: cannot store a {type(obj).__name__} in the host state")


def _decode(obj):
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag == "__tensor__":
            dtype, shape, data = value
            raw = bytearray(base64.b64decode(data))
            return (torch.frombuffer(raw, dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape).clone()
                    if raw else torch.empty(shape, dtype=getattr(torch, dtype)))
        if tag == "__ndarray__":
            dtype, shape, data = value
            return np.frombuffer(base64.b64decode(data), dtype=np.dtype(dtype)).reshape(shape).copy()
        if tag == "__bytes__":
            return base64.b64decode(value)
        if tag == "__tuple__":
            return tuple(_decode(v) for v in value)
        if tag == "__items__":
            return {_decode(k): _decode(v) for k, v in value}
    return {k: _decode(v) for k, v in obj.items()}


def dumps(obj) -> bytes:
    return json.dumps(_encode(obj)).encode()


def loads(data: bytes):
    return _decode(json.loads(data.decode()))
