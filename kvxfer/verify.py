"""Independent views of a cache through torch indexing, used to verify transfers.

These never use the byte strides of `kvxfer.layouts`: each layout's logical view
`[num_blocks, kv, H, block_size, D]` is written down with permute/view from the tensor's shape,
so a wrong stride in a layout module cannot hide behind the same wrong stride here.
"""

from __future__ import annotations

import torch

from kvxfer.errors import LayoutError


def block_view(layout: str, cache: torch.Tensor) -> torch.Tensor:
    """`[num_blocks, kv, H, block_size, D]` view of one layer's cache (kv=1 for MLA).

    TRT-LLM pools have no kv axis per page: they return `[num_pages, 1, H, block_size, D]`.
    """
    if layout == "flashinfer-hnd":  # [N, 2, H, bs, D]
        return cache
    if layout == "flashinfer-nhd":  # [N, 2, bs, H, D]
        return cache.permute(0, 1, 3, 2, 4)
    if layout == "flash-attn-hnd":  # [2, N, H, bs, D]
        return cache.permute(1, 0, 2, 3, 4)
    if layout == "flash-attn-nhd":  # [2, N, bs, H, D]
        return cache.permute(1, 0, 3, 2, 4)
    if layout == "packed":  # [N, H, bs, 2D]: per (block, head) bs K rows, then bs V rows
        n, h, bs, d2 = cache.shape
        return cache.view(n, h, 2, bs, d2 // 2).permute(0, 2, 1, 3, 4)
    if layout == "kvlast-hnd":  # [N, H, bs, 2D]: per token a K row, then a V row
        return cache.unflatten(-1, (2, -1)).permute(0, 3, 1, 2, 4)
    if layout == "kvlast-nhd":  # [N, bs, H, 2D]
        return cache.unflatten(-1, (2, -1)).permute(0, 3, 2, 1, 4)
    if layout == "kvlast-hbnd":  # [H, N, bs, 2D]
        return cache.unflatten(-1, (2, -1)).permute(1, 3, 0, 2, 4)
    if layout == "trtllm-hnd":  # [P, H, bs, D]
        return cache.unsqueeze(1)
    if layout == "trtllm-nhd":  # [P, bs, H, D]
        return cache.permute(0, 2, 1, 3).unsqueeze(1)
    if layout == "mla":  # [N, bs, D]
        return cache.unsqueeze(1).unsqueeze(1)
    raise LayoutError(f"no torch view for layout={layout!r}")


def _pages(layout: str, block_ids: torch.Tensor) -> list[torch.Tensor]:
    """Page ids per kv: TRT-LLM takes [2, n] (K pages, V pages), others [n] for both."""
    if layout.startswith("trtllm"):
        return [block_ids[0], block_ids[1]]
    if layout == "mla":
        return [block_ids]
    return [block_ids, block_ids]


def read_request(layout: str, cache: torch.Tensor, block_ids, num_tokens: int) -> torch.Tensor:
    """`[kv, H, num_tokens, D]`: the request's tokens gathered from its blocks."""
    view = block_view(layout, cache)
    ids = torch.as_tensor(block_ids, dtype=torch.long)
    out = []
    for kv, pages in enumerate(_pages(layout, ids)):
        plane = view[pages, 0 if layout.startswith("trtllm") else kv]  # [n, H, bs, D]
        n, h, bs, d = plane.shape
        out.append(plane.permute(1, 0, 2, 3).reshape(h, n * bs, d)[:, :num_tokens])
    return torch.stack(out)


def write_request(layout: str, cache: torch.Tensor, block_ids, kv_tokens: torch.Tensor) -> None:
    """Scatter `[kv, H, num_tokens, D]` into the request's blocks (the inverse of read_request)."""
    view = block_view(layout, cache)
    ids = torch.as_tensor(block_ids, dtype=torch.long)
    num_tokens = kv_tokens.shape[2]
    for kv, pages in enumerate(_pages(layout, ids)):
        plane_index = 0 if layout.startswith("trtllm") else kv
        bs = view.shape[3]
        for slot, page in enumerate(pages.tolist()):
            lo, hi = slot * bs, min((slot + 1) * bs, num_tokens)
            if lo >= hi:
                break
            view[page, plane_index, :, : hi - lo] = kv_tokens[kv, :, lo:hi]
