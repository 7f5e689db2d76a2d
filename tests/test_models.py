"""Model resolution errors and the attention-support check."""

from types import SimpleNamespace

import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from rheads.models import ModelNotFoundError, UnsupportedModelError, check_attention_supported, resolve_model
from rheads.profiling.profile import layer_windows


def test_full_attention_models_are_supported():
    check_attention_supported(LlamaConfig())
    check_attention_supported(Qwen2Config())  # use_sliding_window defaults to False
    check_attention_supported(MistralConfig(sliding_window=None))


def test_sliding_window_models_are_supported_with_their_windows():
    check_attention_supported(MistralConfig(sliding_window=4096))
    assert layer_windows(MistralConfig(sliding_window=64, num_hidden_layers=2)) == [64, 64]
    assert layer_windows(MistralConfig(sliding_window=None, num_hidden_layers=2)) == [None, None]
    qwen = Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=2, num_hidden_layers=4)
    check_attention_supported(qwen)
    assert layer_windows(qwen) == [None, None, 64, 64]  # Qwen2 windows the layers from max_window_layers on
    assert layer_windows(Qwen2Config(sliding_window=64, num_hidden_layers=2)) == [None, None]


def test_other_layer_kinds_are_refused_with_a_reason():
    config = SimpleNamespace(model_type="hybrid", layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(UnsupportedModelError, match="chunked_attention layers"):
        check_attention_supported(config)
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        check_attention_supported(SimpleNamespace(model_type="encoder", use_bidirectional_attention=True))


@pytest.mark.parametrize("spec", ["./missing-dir", "/nope/model.gguf", "no-such-preset"])
def test_unknown_models_say_what_to_do(spec):
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(spec)
    assert spec.split("/")[-1] in str(error.value)
