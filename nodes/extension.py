"""The ComfyUI extension object: the list of LoRA² nodes (loaded only inside ComfyUI)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply import ApplyAdaptiveLoRA
from .compress import CompressLoRA
from .merge import ExpandForMerge
from .merge_loras import MergeLoRAs
from .report import RankReport
from .subject import LoadSubjectImages
from .train import TrainAdaptiveLoRA

NODES: list[type[io.ComfyNode]] = [LoadSubjectImages, TrainAdaptiveLoRA, ApplyAdaptiveLoRA,
                                   RankReport, ExpandForMerge, CompressLoRA, MergeLoRAs]


class LoRA2Extension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
