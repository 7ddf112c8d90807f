"""How a block drafter reads the image positions of a VLM target's sequence (a field of
the DFlash checkpoint, ``dflash_config.vision``; absent: image positions are read like
text, the drafter is text-only).

Two styles, so they can be measured side by side:

* ``vispec`` (ViSpec, arXiv 2509.15235): ``num_queries`` learned queries cross-attend over
  each image span's context features (the drafter's projection of the target's hidden
  states there); their outputs replace the span in the drafter's context, kept at the
  span's first positions, and the last output is the span's *global image feature*. The
  mean global feature of the request's images is added to every draft input through a
  projection initialised to zero (so an untrained adaptor drafts as the text drafter).
* ``msd`` (MSD, arXiv 2505.14260): image positions skip the projection of the target's
  hidden states; their context is the target's *input embeddings* there (the vision
  projector's outputs) through a projection of their own. The drafter reads one more
  target state, layer ``-1`` (the input embeddings), after its ``target_layer_ids``.

An image *span* is a maximal run of placeholder tokens (the VLM's image tokens and the
tokens around them). A span enters the context once the token after it is known (the
serving side buffers a span that a prefill chunk cut, :func:`complete_spans`): a block at
anchor ``p`` sees the spans that end before ``p``, in training and in serving alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

STYLES = ("vispec", "msd")


@dataclass(frozen=True)
class VisionConfig:
    style: str
    num_queries: int = 4        # vispec: context rows (and queries) per image span

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"dflash_config.vision.style={self.style!r}; allowed values: "
                             f"{', '.join(STYLES)}")
        if self.style == "vispec" and not 1 <= int(self.num_queries) <= 256:
            raise ValueError(f"dflash_config.vision.num_queries={self.num_queries} must be "
                             "an integer in [1, 256]")

    @property
    def reads_embeddings(self) -> bool:
        """The drafter reads the target's input embeddings (layer -1) too."""
        return self.style == "msd"

    @classmethod
    def from_dict(cls, d: dict | None) -> "VisionConfig | None":
        if not d:
            return None
        unknown = set(d) - {"style", "num_queries"}
        if unknown:
            raise ValueError(f"dflash_config.vision has unknown fields {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.style != "vispec":
            d.pop("num_queries")
        return d


def spans(image: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of every run of True in ``image [n]`` (bool)."""
    if not bool(image.any()):
        return []
    x = torch.cat((image.new_zeros(1), image, image.new_zeros(1))).to(torch.int8)
    edges = torch.diff(x).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


def complete_spans(image: torch.Tensor, next_is_text: bool) -> int:
    """How many leading rows of a segment (``image [n]``: which rows are image positions)
    can enter the context now: all, unless the segment ends inside a span whose end is not
    known yet (``next_is_text``: the token after the segment is known and is text)."""
    n = len(image)
    if n == 0 or next_is_text or not bool(image[-1]):
        return n
    text = (~image).nonzero()
    return int(text[-1]) + 1 if len(text) else 0


class VisionAdaptor(nn.Module):
    """The adaptor's parameters (checkpoint keys ``vision.*``) and its two functions:
    :meth:`image_rows` (the context rows of one image span) and :meth:`draft_input`
    (the global feature's share of every draft input)."""

    def __init__(self, config: VisionConfig, hidden_size: int, embed_size: int,
                 num_heads: int, eps: float):
        super().__init__()
        self.config = config
        H = hidden_size
        self.norm = nn.Parameter(torch.ones(H))    # RMSNorm weight of the image rows
        self.eps = eps
        if config.style == "vispec":
            self.heads = num_heads if H % num_heads == 0 else 1
            self.queries = nn.Parameter(torch.randn(config.num_queries, H) * H ** -0.5)
            self.k_proj = nn.Linear(H, H, bias=False)
            self.v_proj = nn.Linear(H, H, bias=False)
            self.fuse = nn.Linear(H, H, bias=False)
            nn.init.zeros_(self.fuse.weight)
        else:
            self.fc = nn.Linear(embed_size, H, bias=False)

    def _rms(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * self.norm

    def image_rows(self, features: torch.Tensor, embeds: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One image span of ``m`` positions -> its context rows and global feature.

        features [m, H]: the drafter's text projection of the target states there.
        embeds [m, He]: the target's input embeddings there (msd only).
        Returns rows ``[r, H]`` for the span's first ``r`` positions (vispec:
        ``r = min(num_queries, m)``, the last queries' outputs; msd: ``r = m``) and the
        global feature ``[H]`` (vispec) or None (msd)."""
        if self.config.style == "msd":
            return self._rms(self.fc(embeds.to(self.fc.weight.dtype))), None
        m, H = features.shape
        nh = self.heads
        q = self.queries[-min(m, len(self.queries)):]                     # [r, H]
        k = self.k_proj(features).view(m, nh, H // nh).transpose(0, 1)    # [nh, m, hd]
        v = self.v_proj(features).view(m, nh, H // nh).transpose(0, 1)
        att = F.scaled_dot_product_attention(q.view(len(q), nh, H // nh).transpose(0, 1), k, v)
        rows = self._rms(q + att.transpose(0, 1).reshape(len(q), H))       # [r, H]
        return rows, rows[-1]

    def draft_input(self, global_feature: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` (zeros for a request without images) -> what is added to every slot
        of its draft block."""
        return self.fuse(global_feature)
