"""InternLM2 LLM config for InternVL2-2B/8B/26B checkpoints (`llm_config` of config.json).

Written by raylens for transformers 5.x and shipped inside checkpoint directories as remote code; transformers
has no native InternLM2. lmdeploy's InternLM2 reads hidden_size, num_attention_heads, num_key_value_heads,
intermediate_size, num_hidden_layers, rms_norm_eps, bias, vocab_size, pad/bos/eos ids, max_position_embeddings
and the RoPE settings.

RoPE pitfall (notes/lmdeploy.md 1.5): everything, `rope_scaling` included, is assigned BEFORE
`super().__init__()`. The base class then turns `rope_theta`/`rope_scaling` into `rope_parameters`
(`{"rope_theta": ..., "rope_type": "default"}` when there is no scaling). Setting `self.rope_scaling = None`
after `super().__init__()` would go through transformers' property setter, set `rope_parameters = None` and
crash lmdeploy's `get_rope_theta`; never do that here.
"""
from transformers import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=103168,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        bias=True,
        rope_theta=10000.0,
        rope_scaling=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        self.bias = bias
        self.rope_theta = rope_theta
        # A dict copy: the base class adds keys to it (rope_theta, rope_type).
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        super().__init__(**kwargs)
