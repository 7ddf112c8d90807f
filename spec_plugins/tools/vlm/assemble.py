"""Stage 1 and 3: the Idefics3 checkpoint's parts, and writing them out.

Idefics3 is SmolVLM's architecture (a SigLIP-style encoder, pixel shuffle, one linear
connector, a Llama language model), served natively by vLLM. ``parts`` makes the vision
encoder (randomly initialised), the connector, the image processor and the tokenizer:
SmolLM2's, with four unused special tokens renamed to Idefics3's image tokens
(``<jupyter_start>`` -> ``<fake_token_around_image>``, ``<jupyter_text>`` -> ``<global-img>``,
``<jupyter_code>`` -> ``<end_of_utterance>``, ``<jupyter_output>`` -> ``<image>``), so every
one is inside the language model's vocabulary (vLLM's Idefics3 embeds the placeholder ids
before it puts the image features there) and the language model's weights are SmolLM2's,
unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
RENAMED = {"<jupyter_start>": "<fake_token_around_image>", "<jupyter_text>": "<global-img>",
           "<jupyter_code>": "<end_of_utterance>", "<jupyter_output>": IMAGE_TOKEN}


# SmolLM2's chat template (same text for string contents), extended to OpenAI content
# parts: an image part becomes ``<image>``, which the processor expands to the image's
# span. Both engines then place images where the request put them (vLLM and SGLang read
# a template that loops over parts as taking parts).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}{{ '" + IMAGE_TOKEN + "' }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclass(frozen=True)
class VisionShape:
    image_size: int = 224
    patch_size: int = 32
    # Pixel shuffle off (SmolVLM shuffles 4x4): 7x7 patches are 49 image tokens, and the
    # encoder sees 49 positions, which keeps its alignment to minutes on a CPU.
    scale_factor: int = 1
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor ** 2


def _tokenizer_files(lm_dir: Path, out: Path) -> None:
    """SmolLM2's tokenizer files with Idefics3's image tokens renamed from unused ones."""
    tok = json.loads((lm_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for old, new in RENAMED.items():
        vocab[new] = vocab.pop(old)
    for added in tok["added_tokens"]:
        added["content"] = RENAMED.get(added["content"], added["content"])
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = json.loads((lm_dir / "tokenizer_config.json").read_text())
    cfg.pop("added_tokens_decoder", None)     # rebuilt from tokenizer.json
    cfg["extra_special_tokens"] = list(RENAMED.values())
    cfg.pop("additional_special_tokens", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def parts(lm_dir: Path, work: Path, shape: VisionShape, seed: int = 0):
    """(encoder, connector, processor, config) for ``lm_dir``; the tokenizer files go
    into ``work`` (the checkpoint being built)."""
    from transformers import AutoConfig, Idefics3Config, Idefics3Processor
    from transformers.models.idefics3 import Idefics3ImageProcessorPil
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import (Idefics3Connector,
                                                                Idefics3VisionTransformer)

    _tokenizer_files(lm_dir, work)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(work)
    text_config = AutoConfig.from_pretrained(lm_dir)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_token_id < text_config.vocab_size, (image_token_id, text_config.vocab_size)
    vision_config = Idefics3VisionConfig(
        image_size=shape.image_size, patch_size=shape.patch_size, hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers, intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads)
    config = Idefics3Config(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
                            scale_factor=shape.scale_factor, image_token_id=image_token_id,
                            tie_word_embeddings=text_config.tie_word_embeddings,
                            pad_token_id=text_config.pad_token_id)
    config.architectures = ["Idefics3ForConditionalGeneration"]
    config.dtype = "float32"
    torch.manual_seed(seed)
    encoder = Idefics3VisionTransformer(config.vision_config).float()
    connector = Idefics3Connector(config).float()
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": shape.image_size}, max_image_size={"longest_edge": shape.image_size},
        do_image_splitting=False)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=shape.image_tokens,
                                  chat_template=CHAT_TEMPLATE)
    return encoder, connector, processor, config


def write(out: Path, lm_dir: Path, encoder, connector, processor, config, about: dict) -> None:
    """Save the checkpoint into ``out`` (which holds the tokenizer files already)."""
    from safetensors.torch import load_file, save_file

    weights = {k.replace("model.", "model.text_model.", 1): v
               for k, v in load_file(str(lm_dir / "model.safetensors")).items()}
    weights |= {f"model.vision_model.{k}": v for k, v in encoder.state_dict().items()}
    weights |= {f"model.connector.{k}": v for k, v in connector.state_dict().items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(out)
    processor.save_pretrained(out)
    if (lm_dir / "generation_config.json").exists():
        (out / "generation_config.json").write_text((lm_dir / "generation_config.json").read_text())
    (out / "spec_plugins_vlm.json").write_text(json.dumps(about, indent=1) + "\n")
