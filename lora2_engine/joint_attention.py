"""The entropy term (Eq. 14) for joint attention (Flux / MMDiT / Qwen-Image / Lumina 2 blocks).

Joint attention attends over [text; image] tokens at once. The analogue of SD's cross-attention
is what the image queries read from the prompt: the image-query rows restricted to the
text-token columns, renormalised over those columns (the softmax of ``q_img k_txt^T / sqrt d``
over the text tokens). Its entropy is taken on the q and k the model really uses: after the q/k
RMSNorm (forward hooks on the blocks' norm modules) and after RoPE (the block's RoPE argument,
caught by a forward pre-hook on the block).

Two block shapes are covered. Double-stream blocks (Flux, SD3 / SD3.5, Qwen-Image) project
image and text tokens with separate weights: the image queries come from one norm, the text
keys from another. Single-stream blocks (Lumina 2's ``layers``) project the joint sequence with one
weight: one norm gives all queries, another all keys, split at the text length (caught from
the output of a module that sees the text tokens alone, e.g. Lumina's ``context_refiner``).
Tensors may be heads-first ``(B, H, L, D)`` with RoPE ``(B, 1, L, ...)`` or sequence-first
``(B, L, H, D)`` with RoPE ``(B, L, 1, ...)`` (ComfyUI uses both; MMDiT: sequence-first, no
RoPE); grouped keys (GQA) are repeated per query head, as the attention does.
"""

from __future__ import annotations

import re

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


def _output(path: str) -> tuple[str, int | None]:
    """``"attn.norm[1]"`` → (``"attn.norm"``, 1): a module and which element of its output."""
    m = re.fullmatch(r"(.+?)(?:\[(\d+)\])?", path)
    return m.group(1), None if m.group(2) is None else int(m.group(2))


class JointAttentionCapture(EntropyCapture):
    """Records :func:`text_entropy` of every joint-attention block during a forward pass.

    ``blocks``: the ModuleList of joint blocks (Flux: ``double_blocks``). ``img_q`` /
    ``txt_k``: the module (in each block) whose output is the normed image queries / text keys,
    ``[i]`` picking an element of a tuple output (Flux's QKNorm returns ``(q, k)``); the entropy
    is taken when the second of the two has run, in either order (SD3 runs the text stream
    first). ``pe``: the block's RoPE argument (keyword, and position when passed positionally),
    covering [text; image] tokens, text first; ``None`` for blocks without RoPE (MMDiT).
    ``sequence_first``: q and k are ``(B, L, H, D)`` (inferred from the RoPE's layout when there
    is one). ``text_len``: for single-stream blocks, a module (in the model) whose output's dim 1
    is the number of text tokens; q and k are then over the joint sequence. Only the hooks differ
    from ``objective.EntropyCapture`` (``values``, ``mean``, ``remove``...).
    """

    def __init__(self, model: nn.Module, blocks: str = "double_blocks",
                 img_q: str = "img_attn.norm[0]", txt_k: str = "txt_attn.norm[1]",
                 pe: tuple[str, int] | None = ("pe", 3), text_len: str | None = None,
                 sequence_first: bool = False) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.enabled = True
        self._pe: dict[str, torch.Tensor | None] = {}
        self._q: dict[str, dict[str, torch.Tensor]] = {}  # block → what it has produced so far
        self._n_txt: int | None = None
        self._handles = []
        self._pe_arg, self._sequence_first = pe, sequence_first
        (q_path, q_index), (k_path, k_index) = _output(img_q), _output(txt_k)
        container = getattr(model, blocks, None)
        self.num_layers = 0
        for i, block in enumerate(container if isinstance(container, nn.ModuleList) else ()):
            name = f"{blocks}.{i}"
            try:
                q_mod, k_mod = block.get_submodule(q_path), block.get_submodule(k_path)
            except AttributeError:
                continue
            if pe is not None:
                self._handles.append(block.register_forward_pre_hook(self._store_pe(name),
                                                                     with_kwargs=True))
            self._handles += [q_mod.register_forward_hook(self._store(name, "q", q_index)),
                              k_mod.register_forward_hook(self._store(name, "k", k_index))]
            self.num_layers += 1
        if text_len is not None and self.num_layers:
            self._handles.append(model.get_submodule(text_len).register_forward_hook(
                self._store_text_len))

    def _store_text_len(self, _m, _inp, out):
        if self.enabled:
            self._n_txt = out.shape[1]

    def _store_pe(self, name: str):
        key, pos = self._pe_arg

        def hook(_m, args, kwargs):
            if self.enabled:
                self._pe[name] = kwargs.get(key, args[pos] if len(args) > pos else None)
        return hook

    def _store(self, name: str, slot: str, index: int | None):
        def hook(_m, _inp, out):
            if not self.enabled:
                return
            seen = self._q.setdefault(name, {})
            seen[slot] = out if index is None else out[index]
            if len(seen) == 2:
                del self._q[name]
                self.values[name] = self._entropy(seen["q"], seen["k"], self._pe.get(name))
        return hook

    def _entropy(self, q: torch.Tensor, k: torch.Tensor,
                 pe: torch.Tensor | None) -> torch.Tensor:
        if self._sequence_first or (pe is not None and pe.shape[1] != 1):  # (B, L, H, D)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            pe = None if pe is None else pe.transpose(1, 2)
        if self._n_txt is not None:  # single stream: split [text; image]
            q, k = q[:, :, self._n_txt:], k[:, :, :self._n_txt]
        if k.shape[1] != q.shape[1]:  # grouped keys: each serves H / H_kv query heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        n_txt = k.shape[-2]
        pe_txt, pe_img = (None, None) if pe is None else (pe[:, :, :n_txt], pe[:, :, n_txt:])
        return text_entropy(q, k, pe_img, pe_txt)

    def clear(self) -> None:
        super().clear()
        self._pe.clear()
