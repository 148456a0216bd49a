"""Top-level InternVL2 config (`model_type: internvl_chat`, `architectures: ["InternVLChatModel"]`).

Written by raylens for transformers 5.x and shipped inside checkpoint directories as remote code, referenced
from config.json's `auto_map.AutoConfig`. Its one job beyond storing the JSON keys: turn `vision_config` and
`llm_config` into real config objects, because lmdeploy reads `config.llm_config.hidden_size` etc. as
attributes (a plain dict makes its environment checker call `exit(1)`, notes/lmdeploy.md 1.1).

The LLM config class is chosen from `llm_config["architectures"][0]`: InternLM2 uses the sibling
`configuration_internlm2.py` (transformers has no InternLM2); Qwen2, Llama and Phi-3 use transformers' own
classes through `CONFIG_MAPPING`.

The class defaults are the upstream ones (ps_version "v1", no dynamic tiling, no thumbnail), so a config.json
for InternVL2 must spell out the InternVL2 values; raylens' writer always does.
"""
from transformers import PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING

from .configuration_intern_vit import InternVisionConfig
from .configuration_internlm2 import InternLM2Config

# transformers model_type for each LLM architecture that InternVL checkpoints use.
_NATIVE_LLM_TYPES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Phi3ForCausalLM": "phi3",
}


def _llm_config_from_dict(llm_config):
    architecture = (llm_config.get("architectures") or ["InternLM2ForCausalLM"])[0]
    if architecture == "InternLM2ForCausalLM":
        return InternLM2Config(**llm_config)
    model_type = llm_config.get("model_type") or _NATIVE_LLM_TYPES.get(architecture)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"llm_config architecture {architecture!r} (model_type {model_type!r}) is not supported; "
            f"expected InternLM2ForCausalLM or one of {sorted(_NATIVE_LLM_TYPES)}"
        )
    fields = {k: v for k, v in llm_config.items() if k != "model_type"}
    return CONFIG_MAPPING[model_type](**fields)


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"

    def __init__(
        self,
        vision_config=None,
        llm_config=None,
        use_backbone_lora=0,
        use_llm_lora=0,
        select_layer=-1,
        force_image_size=None,
        downsample_ratio=0.5,
        template=None,
        dynamic_image_size=False,
        use_thumbnail=False,
        ps_version="v1",
        min_dynamic_patch=1,
        max_dynamic_patch=6,
        tie_word_embeddings=False,
        **kwargs,
    ):
        if vision_config is None:
            vision_config = {}
        if isinstance(vision_config, dict):
            vision_config = InternVisionConfig(**vision_config)
        if llm_config is None:
            llm_config = {"architectures": ["InternLM2ForCausalLM"]}
        if isinstance(llm_config, dict):
            llm_config = _llm_config_from_dict(llm_config)
        self.vision_config = vision_config
        self.llm_config = llm_config
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(**kwargs)
