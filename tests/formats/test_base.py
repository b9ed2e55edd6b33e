"""The copy-free safetensors writer produces files the safetensors library reads back exactly."""

from __future__ import annotations

import torch

from gcupipe.formats.base import ShardWriter, write_safetensors


def test_write_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        "bf16": torch.randn(3, 5).bfloat16(),
        "int8": torch.randint(-128, 127, (7,), dtype=torch.int8),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.arange(6, dtype=torch.int32).reshape(2, 3).t(),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_shard_writer_splits_and_indexes(tmp_path):
    import json

    writer = ShardWriter(tmp_path, "model", "model.safetensors.index.json", max_shard_bytes=100)
    for i in range(3):
        writer.add(f"t{i}", torch.zeros(30))  # 120 bytes each: one shard per tensor
        writer.maybe_flush()
    files = writer.finish()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {f"t{i}": files[i] for i in range(3)}
    assert not list(tmp_path.glob(".*"))
