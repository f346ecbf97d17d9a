"""The entropy term (Eq. 14) for joint attention (Flux / MMDiT double-stream blocks).

Joint attention attends over [text; image] tokens at once. The analogue of SD's cross-attention
is what the image queries read from the prompt: the image-query rows restricted to the
text-token columns, renormalised over those columns (the softmax of ``q_img k_txt^T / sqrt d``
over the text tokens). Its entropy is taken on the q and k the model really uses: after the q/k
RMSNorm (forward hooks on the blocks' ``norm`` modules, which return ``(q, k)``) and after RoPE
(the block's ``pe`` argument, caught by a forward pre-hook on the block).
"""

from __future__ import annotations

import torch
from torch import nn

from .objective import EntropyCapture, attention_entropy


def rotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """RoPE: rotate consecutive pairs of ``x`` (B, H, L, D) by the 2x2 matrices ``pe``
    (B or 1, 1, L, D/2, 2, 2), in fp32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)  # (B, H, L, D/2, 1, 2)
    return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(x.shape)


def text_entropy(img_q: torch.Tensor, txt_k: torch.Tensor, pe_img: torch.Tensor | None = None,
                 pe_txt: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy of each image query's attention over the text keys.

    ``img_q``: (B, H, L_img, D), ``txt_k``: (B, H, L_txt, D), RoPE matrices for each (or None).
    """
    if pe_img is not None:
        img_q, txt_k = rotate(img_q, pe_img), rotate(txt_k, pe_txt)
    heads = img_q.shape[1]
    return attention_entropy(img_q.transpose(1, 2).flatten(2), txt_k.transpose(1, 2).flatten(2),
                             heads)


class JointAttentionCapture(EntropyCapture):
    """Records :func:`text_entropy` of every joint-attention block during a forward pass.

    ``blocks``: the ModuleList of joint blocks (Flux: ``double_blocks``); ``img_norm`` /
    ``txt_norm``: each block's q/k-norm modules for the image and text streams (called in that
    order, as Flux does); the RoPE ``pe`` covers [text; image] tokens, text first. Only the
    hooks differ from ``objective.EntropyCapture`` (``values``, ``mean``, ``remove``...).
    """

    def __init__(self, model: nn.Module, blocks: str = "double_blocks",
                 img_norm: str = "img_attn.norm", txt_norm: str = "txt_attn.norm") -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.enabled = True
        self._pe: dict[str, torch.Tensor | None] = {}
        self._q: dict[str, torch.Tensor] = {}
        self._handles = []
        container = getattr(model, blocks, None)
        for i, block in enumerate(container if isinstance(container, nn.ModuleList) else ()):
            name = f"{blocks}.{i}"
            try:
                img, txt = block.get_submodule(img_norm), block.get_submodule(txt_norm)
            except AttributeError:
                continue
            self._handles += [
                block.register_forward_pre_hook(self._store_pe(name), with_kwargs=True),
                img.register_forward_hook(self._store_q(name)),
                txt.register_forward_hook(self._entropy(name))]
        self.num_layers = len(self._handles) // 3

    def _store_pe(self, name: str):
        def hook(_m, args, kwargs):
            if self.enabled:
                self._pe[name] = kwargs.get("pe", args[3] if len(args) > 3 else None)
        return hook

    def _store_q(self, name: str):
        def hook(_m, _inp, out):
            if self.enabled:
                self._q[name] = out[0]  # (B, H, L_img, D) after the q norm
        return hook

    def _entropy(self, name: str):
        def hook(_m, _inp, out):
            if not self.enabled or name not in self._q:
                return
            img_q, txt_k, pe = self._q.pop(name), out[1], self._pe.get(name)
            n_txt = txt_k.shape[-2]
            pe_txt, pe_img = (None, None) if pe is None else (pe[:, :, :n_txt],
                                                              pe[:, :, n_txt:])
            self.values[name] = text_entropy(img_q, txt_k, pe_img, pe_txt)
        return hook

    def clear(self) -> None:
        super().clear()
        self._pe.clear()
