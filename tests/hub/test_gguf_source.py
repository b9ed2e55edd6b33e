"""The gguf source: a tiny Llama written to GGUF here, converted by the download stage,
gives the same logits as the model it came from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gcupipe.errors import StageError
from gcupipe.stages.base import StageContext
from gcupipe.stages.download import DownloadConfig, DownloadStage


def _ctx(tmp_path: Path) -> StageContext:
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "scratch").mkdir(exist_ok=True)
    return StageContext(
        stage_id="download",
        output_dir=tmp_path / "out",
        scratch_dir=tmp_path / "scratch",
        cache_dir=tmp_path / "cache",
        run_dir=tmp_path,
        log=lambda message: None,
    )


def _manifest_paths(manifest: Path) -> set[str]:
    return {entry["path"] for entry in json.loads(manifest.read_text())["files"]}


def _write_tiny_llama_gguf(path: Path):  # type: ignore[no-untyped-def]
    """A random tiny Llama, written to GGUF the way llama.cpp lays Llama out (tensor names,
    metadata keys, and the q/k row permutation that transformers undoes when reading)."""
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads, kv_heads = 4, 2
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()

    def interleave_rope_rows(weight, n_head):  # type: ignore[no-untyped-def]
        rows = weight.shape[0] // n_head // 2
        return (
            weight.reshape(n_head, 2, rows, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
        )

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_block_count(2)
    writer.add_feed_forward_length(64)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(32 // heads)
    writer.add_vocab_size(64)
    top = {
        "model.embed_tokens.weight": "token_embd",
        "model.norm.weight": "output_norm",
        "lm_head.weight": "output",
    }
    per_layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        if name in top:
            gguf_name = top[name]
        else:
            parts = name.split(".")
            module = ".".join(parts[3:-1])
            gguf_name = f"blk.{parts[2]}.{per_layer[module]}"
            if module == "self_attn.q_proj":
                array = interleave_rope_rows(array, heads)
            elif module == "self_attn.k_proj":
                array = interleave_rope_rows(array, kv_heads)
        writer.add_tensor(f"{gguf_name}.weight", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_gguf_round_trip_gives_the_same_logits(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    source_model = _write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    outputs = DownloadStage().run(
        DownloadConfig(source="gguf", path=tmp_path / "tiny.gguf"), _ctx(tmp_path)
    )
    config = json.loads((outputs.model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert outputs.source.startswith("gguf:")
    assert "model.safetensors" in _manifest_paths(outputs.manifest)
    loaded = AutoModelForCausalLM.from_pretrained(str(outputs.model_dir)).eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = source_model(ids).logits, loaded(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_gguf_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(StageError) as err:
        DownloadStage().run(DownloadConfig(source="gguf", path=bad), _ctx(tmp_path))
    assert "bad.gguf" in str(err.value) and "\n" not in str(err.value)
    assert os.listdir(tmp_path / "out") == []
