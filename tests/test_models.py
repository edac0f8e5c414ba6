"""The embedded tiny preset and loading a model folder from a local path."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dapo_rl.models.loading import TINY_PRESET, ModelNotFoundError, load_policy, save_policy


def test_tiny_preset_is_qwen2_and_seeded():
    model_a, tokenizer = load_policy(TINY_PRESET, seed=3)
    model_b, _ = load_policy(TINY_PRESET, seed=3)
    model_c, _ = load_policy(TINY_PRESET, seed=4)
    assert model_a.config.model_type == "qwen2"
    assert model_a.config.vocab_size == len(tokenizer)
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, c) for a, c in zip(model_a.parameters(), model_c.parameters()))


def test_tokenizer_is_one_token_per_ascii_character_and_lossless():
    _, tokenizer = load_policy(TINY_PRESET)
    text = "What is 12 + 7?\nAnswer: 19"
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    unicode_text = "求 x 的值: ½"
    assert tokenizer.decode(tokenizer(unicode_text).input_ids) == unicode_text
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def test_saved_folder_loads_with_auto_classes(tmp_path):
    model, tokenizer = load_policy(TINY_PRESET, seed=1)
    save_policy(model, tokenizer, tmp_path)
    reloaded_model = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "3*4=\nAnswer: 12"
    assert reloaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded_model(ids).logits, atol=1e-6)
    via_loader, _ = load_policy(tmp_path)
    assert via_loader.config.vocab_size == model.config.vocab_size


def test_missing_model_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        load_policy(missing)


def test_bad_dtype_name_is_rejected():
    with pytest.raises(ValueError, match="float33"):
        load_policy(TINY_PRESET, dtype="float33")
