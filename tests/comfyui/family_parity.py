"""Run under COMFYUI_PYTHON with cwd = COMFYUI_PATH: ComfyUI loads a stand-in file, detects it,
and computes its diffusion model's output on given inputs (a script, not a test module).

``python family_parity.py WEIGHTS INPUTS OUT`` prints ``RESULT {"config", "family",
"entropy"}``: the family's entropy capture (text→image attention) run on ComfyUI's module.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.getcwd())

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import torch  # noqa: E402
from inprocess_checks import import_pack  # noqa: E402


def main() -> None:
    import inspect

    import comfy.sd
    import comfy.utils
    from safetensors.torch import load_file, save_file

    weights, inputs, out = sys.argv[1:4]
    mods = import_pack()
    sd, metadata = comfy.utils.load_torch_file(weights, return_metadata=True)
    load = comfy.sd.load_diffusion_model_state_dict  # metadata (a file's config): 0.28.0 only
    extra = {"metadata": metadata} if "metadata" in inspect.signature(load).parameters else {}
    model = load(sd, **extra)
    base = model.model
    inp = load_file(inputs)
    conds = {k: v for k, v in inp.items() if k not in ("x", "t", "c_crossattn")}
    fam = mods["nodes.bridge"].model_family(base)
    capture = fam.entropy(base.diffusion_model) if fam is not None and fam.entropy else None
    with torch.no_grad():
        o = base.diffusion_model(inp["x"], inp["t"], context=inp["c_crossattn"], **conds)
    save_file({"out": o.float().contiguous()}, out)
    print("RESULT " + json.dumps({"config": type(base.model_config).__name__,
                                  "family": getattr(fam, "name", None),
                                  "entropy": capture and float(capture.mean())}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
