"""CPU attention with tree masks, registered in vLLM's attention backend registry.

``hooks.activate`` registers :class:`TreeCPUAttentionBackend` under ``CPU_ATTN``
(``vllm.v1.attention.backends.registry.register_backend``) in engine processes that run a
tree-drafting spec_plugins method. It *is* vLLM's CPU backend whenever the step has no
branching draft tree (``hooks.attach_plan`` hands each builder the step's
:class:`~spec_plugins.vllm.tree_step.TreePlan` for the steps that have one); in a tree
step the requests with trees
go through ``spec_plugins.kernels.tree_attention`` (its C kernel for float32, built on
first use; else its torch path) and the rest through vLLM's own kernel on a sub-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend,
                                                 CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata,
                                                 CPUAttentionMetadataBuilder)

from spec_plugins.kernels import tree_attention
from spec_plugins.vllm.tree_step import TreePlan


@dataclass
class TreeCPUAttentionMetadata(CPUAttentionMetadata):
    tree: tree_attention.TreePlan | None = None
    tree_tokens: torch.Tensor | None = None
    other: CPUAttentionMetadata | None = None   # vLLM's kernel, rows without a tree
    other_tokens: torch.Tensor | None = None


def cpu_metadata(builder: CPUAttentionMetadataBuilder, query_start_loc, max_query_len: int,
                 seq_lens, block_table, slot_mapping, causal: bool = True) -> CPUAttentionMetadata:
    """vLLM CPU attention metadata for a batch the runner did not schedule (a sub-batch
    of a tree step, a layer-skip draft step), with ``builder``'s model shape."""
    b = builder
    return CPUAttentionMetadata(
        num_actual_tokens=int(query_start_loc[-1]), max_query_len=max_query_len,
        query_start_loc=query_start_loc, max_seq_len=int(seq_lens.max()), seq_lens=seq_lens,
        block_table=block_table, slot_mapping=slot_mapping,
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(seq_lens), num_heads=b.num_heads, num_kv_heads=b.num_kv_heads,
            head_dim=b.head_dim, seq_lens=seq_lens, dtype=b.dtype,
            query_start_loc=query_start_loc, causal=causal,
            sliding_window_size=b.window_size, isa=b.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None,
            kv_cache_dtype=b.kv_cache_dtype),
        causal=causal)


class TreeCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    # This step's trees, handed over by ``hooks.attach_plan`` between preparing the
    # step's inputs and sampling; None otherwise.
    tree_plan: TreePlan | None = None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        plan = self.tree_plan
        cm = common_attn_metadata
        if (plan is None or cm.num_reqs != plan.num_reqs
                or cm.num_actual_tokens != plan.num_tokens
                or self.is_cross_attention or self.is_encoder_only_attention):
            return md  # vLLM's own metadata: the impl then runs vLLM's kernel
        md = TreeCPUAttentionMetadata(**md.__dict__)
        rows = torch.from_numpy(plan.rows)
        md.tree = tree_attention.plan(plan.prefix_lens, [t.parents for t in plan.trees],
                                      cm.block_table_tensor.index_select(0, rows),
                                      self.block_size)
        md.tree_tokens = plan.tree_tokens
        if len(plan.other_rows):
            other = torch.from_numpy(plan.other_rows)
            qsl = torch.zeros(len(other) + 1, dtype=cm.query_start_loc.dtype)
            qsl[1:] = torch.from_numpy(np.cumsum(plan.other_q_lens))
            seq_lens = cm.seq_lens.index_select(0, other)
            md.other = cpu_metadata(self, qsl, int(plan.other_q_lens.max()), seq_lens,
                                    cm.block_table_tensor.index_select(0, other),
                                    cm.slot_mapping.index_select(0, plan.other_tokens),
                                    causal=md.causal)
            md.other_tokens = plan.other_tokens
        return md


class TreeCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        md = attn_metadata
        if not isinstance(md, TreeCPUAttentionMetadata) or md.tree is None:
            return super().forward(layer, query, key, value, kv_cache, md, output,
                                   output_scale, output_block_scale)
        if (self.sinks is not None or self.alibi_slopes is not None
                or self.sliding_window != -1 or self.logits_soft_cap
                or self.is_fp8_kv_cache):
            raise NotImplementedError(
                "spec_plugins tree attention supports plain causal attention only "
                "(no sinks, ALiBi, sliding window, soft-cap or fp8 KV cache); "
                "use a chain method (\"tree\": false) for this model")
        n = md.num_actual_tokens
        out = output[:n].view(n, self.num_heads, self.head_size)
        q = query[:n].view(n, self.num_heads, self.head_size)
        nb, kvh, bs, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(nb, kvh, 2 * bs, -1).chunk(2, dim=2)
        if getattr(layer, "isa", "vec") != "vec":
            raise NotImplementedError(
                f"spec_plugins tree attention reads vLLM's 'vec' CPU KV layout; this CPU "
                f"uses {layer.isa!r}. Use a chain method (\"tree\": false)")
        if md.other is not None:
            o = md.other
            sub = torch.empty(o.num_actual_tokens, self.num_heads, self.head_size,
                              dtype=out.dtype)
            ops.cpu_attention_with_kv_cache(
                query=q.index_select(0, md.other_tokens), key_cache=key_cache,
                value_cache=value_cache, output=sub, query_start_loc=o.query_start_loc,
                seq_lens=o.seq_lens, scale=self.scale, causal=o.causal, alibi_slopes=None,
                sliding_window=-1, block_table=o.block_table, softcap=0,
                scheduler_metadata=o.scheduler_metadata, s_aux=None,
                k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                kv_cache_dtype=self.kv_cache_dtype)
            out.index_copy_(0, md.other_tokens, sub)
        if not tree_attention.run_native(md.tree, q, out, md.tree_tokens, kv_cache,
                                         self.scale):
            res = tree_attention.run(md.tree, q.index_select(0, md.tree_tokens),
                                     *tree_attention.split_cache(kv_cache), self.scale)
            out.index_copy_(0, md.tree_tokens, res.to(out.dtype))
        return output


class TreeCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return TreeCPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls():
        return TreeCPUAttentionMetadataBuilder
