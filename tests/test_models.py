"""Model resolution errors and the attention-support check."""

import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from rheads.models import ModelNotFoundError, UnsupportedModelError, check_attention_supported, resolve_model


def test_full_attention_models_are_supported():
    check_attention_supported(LlamaConfig())
    check_attention_supported(Qwen2Config())  # use_sliding_window defaults to False
    check_attention_supported(MistralConfig(sliding_window=None))


def test_sliding_window_models_are_refused_with_a_reason():
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        check_attention_supported(MistralConfig(sliding_window=4096))
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        check_attention_supported(Qwen2Config(use_sliding_window=True, sliding_window=4096, max_window_layers=2,
                                              num_hidden_layers=4))


@pytest.mark.parametrize("spec", ["./missing-dir", "/nope/model.gguf", "no-such-preset"])
def test_unknown_models_say_what_to_do(spec):
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(spec)
    assert spec.split("/")[-1] in str(error.value)
