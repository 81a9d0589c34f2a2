import pytest
import torch
from tokopt.models.graph_meta import graph_meta


@pytest.fixture
def tiny_qwen2_graph():
    """A freshly captured graph of a tiny random Qwen2 model (a real HF architecture class)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tokopt.models.capture import capture

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    gm = capture(Qwen2ForCausalLM(config).eval())
    return gm, graph_meta(gm).spec
