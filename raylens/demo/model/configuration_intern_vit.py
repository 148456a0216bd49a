"""InternViT vision-encoder config for InternVL2 checkpoints (`vision_config` of config.json).

Written by raylens for transformers 5.x and shipped inside checkpoint directories as remote code. Only the
fields lmdeploy's InternViT reads are kept (hidden_size, image_size, patch_size, num_attention_heads,
intermediate_size, num_hidden_layers, qkv_bias, qk_normalization, layer_norm_eps, hidden_act, norm_type);
defaults follow InternViT-6B, as the upstream class does, so a hand-written config must set the 300M values.

Attributes are assigned before `super().__init__()`: transformers 5 configs are dataclasses whose base
`__init__` only resets the base fields, and assigning first is the style lmdeploy was tested with.
"""
from transformers import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    model_type = "intern_vit_6b"

    def __init__(
        self,
        num_channels=3,
        patch_size=14,
        image_size=224,
        qkv_bias=False,
        hidden_size=3200,
        num_attention_heads=25,
        intermediate_size=12800,
        qk_normalization=True,
        num_hidden_layers=48,
        use_flash_attn=False,
        hidden_act="gelu",
        norm_type="rms_norm",
        layer_norm_eps=1e-6,
        dropout=0.0,
        drop_path_rate=0.0,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=0.1,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        super().__init__(**kwargs)
