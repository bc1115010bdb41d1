#!/usr/bin/env python3
"""Writes a PyTorch-format .pth state dict (zip + pickle, as torch.save does) holding the
tensors of a safetensors file, without needing torch installed: the pickle references
torch._utils._rebuild_tensor_v2 and torch.FloatStorage by name, exactly as torch writes them.

Used by tests/cli.rs to check `easel weights convert`. Usage: make_pth.py IN.safetensors OUT.pth
"""
import collections
import json
import pickle
import struct
import sys
import types
import zipfile

torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")


class FloatStorage:
    pass


def _rebuild_tensor_v2(*args):
    raise RuntimeError("only for pickling by reference")


FloatStorage.__module__ = "torch"
_rebuild_tensor_v2.__module__ = "torch._utils"
torch.FloatStorage = FloatStorage
torch._utils = torch_utils
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


class StorageRef:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class TensorRef:
    def __init__(self, key, shape):
        self.key, self.shape = key, shape

    def __reduce__(self):
        numel, stride = 1, []
        for d in reversed(self.shape):
            stride.insert(0, numel)
            numel *= d
        args = (StorageRef(self.key, numel), 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict())
        return (_rebuild_tensor_v2, args)


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
        return None


def main(src, dst):
    raw = open(src, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    state = collections.OrderedDict()
    blobs = {}
    for i, (name, info) in enumerate(sorted((k, v) for k, v in header.items() if k != "__metadata__")):
        assert info["dtype"] == "F32", "this fixture writer handles f32 only"
        a, b = info["data_offsets"]
        blobs[str(i)] = raw[8 + n + a : 8 + n + b]
        state[name] = TensorRef(str(i), info["shape"])
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        buf = __import__("io").BytesIO()
        TorchPickler(buf, protocol=2).dump(state)
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/version", "3\n")
        for key, blob in blobs.items():
            z.writestr(f"archive/data/{key}", blob)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
