"""Cross-attention and its extra key/value streams (IP-Adapter's decoupled cross-attention)."""

import pytest
import torch

from latent_diffusion.nn.attention import CrossAttention, KVStream


def test_an_extra_stream_matches_diffusers_ip_adapter_attention():
    processors = pytest.importorskip("diffusers.models.attention_processor")
    torch.manual_seed(0)
    ours = CrossAttention(16, 8, heads=2, dim_head=8)
    ours.streams["image"] = KVStream(8, 16, scale=0.6)
    theirs = processors.Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8,
                       processor=processors.IPAdapterAttnProcessor2_0(16, 8, num_tokens=(4,), scale=0.6))
    state = {key.replace("streams.image.to_k", "processor.to_k_ip.0").replace("streams.image.to_v",
                                                                             "processor.to_v_ip.0"): value
             for key, value in ours.state_dict().items()}
    theirs.load_state_dict(state)
    x, text, image = torch.randn(2, 10, 16), torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    with torch.no_grad():
        got = ours(x, text, extra_context={"image": image})
        expected = theirs(x, encoder_hidden_states=(text, [image]))
        without = ours(x, text)
        streams = ours.streams.pop("image")
        plain = ours(x, text)
    assert (got - expected).abs().max().item() < 1e-5
    assert torch.equal(without, plain) and (got - plain).abs().max() > 1e-2 and streams.scale == 0.6
