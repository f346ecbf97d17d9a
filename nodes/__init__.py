"""The ComfyUI nodes of LoRA² (node API V3).

Each node module is a thin translation between ComfyUI values and ``lora2_engine`` calls;
``bridge.py`` is the only module that touches ``comfy.*`` and ``folder_paths``, and ``core.py``
holds the ComfyUI-free glue (tested without ComfyUI). Importing this package imports nothing
from ComfyUI: the root ``__init__.py`` loads ``extension.py`` only inside ComfyUI.
"""
