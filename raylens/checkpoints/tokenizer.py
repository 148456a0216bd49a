"""A small byte-level BPE tokenizer with InternVL2's special tokens, trained offline from a corpus.

Why: random-weight checkpoints (tests, benchmarks, the demo model) need a tokenizer, and none can be
downloaded. Byte-level BPE encodes any text, so a few hundred merges learned from the words a model will see
keep sequences short without ever failing on unseen input.

The saved tokenizer carries a `chat_template` rendering the same string as `raylens.prompts` (InternVL2's
MPT-style template with its system message), because lmdeploy picks the tokenizer's chat template
automatically and otherwise falls back to a bare prompt (notes/lmdeploy.md 2.1). It also names the image
tokens the way transformers' InternVL processor expects (`start_image_token`, `end_image_token`,
`context_image_token`).
"""
from __future__ import annotations

import json
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from raylens.prompts import IMG_CONTEXT, IMG_END, IMG_START, TEMPLATES, ChatTemplate, get_template

PAD_TOKEN = "<|endoftext|>"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
PHI3_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# InternVL2's added tokens, in the order its fine-tuning script appends them.
INTERNVL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")


def special_tokens(template: str) -> list[str]:
    """Special tokens in id order: pad first (id 0), then the template's role/stop tokens, then InternVL's."""
    role_tokens = PHI3_TOKENS if TEMPLATES[template].sep == "<|end|>" else CHATML_TOKENS
    return [PAD_TOKEN, *role_tokens, *INTERNVL_TOKENS]


def _jinja_literal(text: str) -> str:
    """`text` as a single-quoted Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def chat_template_for(template: ChatTemplate) -> str:
    """A Jinja chat template producing `raylens.conversation.render`'s layout.

    System turn (the given one, else the template's default; none when that is empty), then
    `role + content + sep` per message, then the assistant role when `add_generation_prompt`. List contents
    render each image part as `<image>\\n` and text parts as-is, the images first (as `render` puts them).
    """
    system_prefix = template.system_template.split("{system_message}")[0]
    sep, user, assistant = (_jinja_literal(s) for s in (template.sep, template.user_role, template.assistant_role))
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}{%- for part in content if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
        "{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
        "{%- endif -%}"
        "{%- endmacro -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        f"{{{{ {_jinja_literal(system_prefix)} + render(messages[0]['content']) + {sep} }}}}"
        "{%- set turns = messages[1:] -%}"
        "{%- else -%}"
        f"{{{{ {_jinja_literal(template.system())} }}}}"
        "{%- set turns = messages -%}"
        "{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        f"{{{{ {user} + render(message['content']) + {sep} }}}}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{ {assistant} + render(message['content']) + {sep} }}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {assistant} }}}}{{%- endif -%}}"
    )


def train_bpe(corpus: Iterable[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with `specials` at ids 0.. and all 256 bytes in the vocab."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is below the {len(specials)} special tokens + {len(alphabet)} bytes")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    return tokenizer


def pad_vocab(backend: Tokenizer, size: int) -> Tokenizer:
    """`backend` with ids len..size-1 filled by `<|unused_N|>` vocabulary entries.

    No merge produces them, so encoding never does; they exist so that every id of an LLM with a bigger
    vocabulary decodes to something. A random-weight 1B model picks ids all over its 151655 rows, and
    lmdeploy's incremental detokenizer cannot handle an id the tokenizer does not know.
    """
    data = json.loads(backend.to_str())
    vocab = data["model"]["vocab"]
    start = max(vocab.values()) + 1
    if size < start:
        raise ValueError(f"cannot pad a vocabulary of {start} tokens down to {size}")
    for i in range(start, size):
        vocab[f"<|unused_{i}|>"] = i
    return Tokenizer.from_str(json.dumps(data))


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512, template: str = "Hermes-2", *,
                    pad_to: int | None = None) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `corpus` and wrap it for transformers, with `template`'s chat template.

    `vocab_size` is an upper bound: training stops early when the corpus has no pair seen twice left to merge,
    so `len(tokenizer)` may be smaller. eos is the template's stop token (`<|im_end|>` for ChatML), pad is
    `<|endoftext|>`; there is no bos, as in Qwen2 (InternVL2 prompts never start with one).
    `pad_to` fills the vocabulary with unreachable placeholders up to that size (`pad_vocab`).
    """
    chat = get_template(template)
    specials = special_tokens(template)
    backend = train_bpe(corpus, vocab_size, specials)
    if pad_to is not None:
        backend = pad_vocab(backend, pad_to)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=chat.end_of_turn,
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
        # Named model-specific tokens (transformers 5: a dict here means named, a list means unnamed extras).
        extra_special_tokens={
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
        },
        chat_template=chat_template_for(chat),
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    # The rest of the specials, so `skip_special_tokens` drops them too.
    others = [t for t in specials if t not in (chat.end_of_turn, PAD_TOKEN, IMG_START, IMG_END, IMG_CONTEXT)]
    tokenizer.add_special_tokens({"extra_special_tokens": others}, replace_extra_special_tokens=False)
    return tokenizer
