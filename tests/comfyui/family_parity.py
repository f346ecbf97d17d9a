"""Run under COMFYUI_PYTHON with cwd = COMFYUI_PATH: ComfyUI loads a stand-in file, detects it,
and computes its diffusion model's output on given inputs (a script, not a test module).

``python family_parity.py WEIGHTS INPUTS OUT`` prints ``RESULT {"config", "family"}``.
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
    import comfy.sd
    from safetensors.torch import load_file, save_file

    weights, inputs, out = sys.argv[1:4]
    mods = import_pack()
    model = comfy.sd.load_diffusion_model_state_dict(load_file(weights))
    base = model.model
    inp = load_file(inputs)
    conds = {k: v for k, v in inp.items() if k not in ("x", "t", "c_crossattn")}
    with torch.no_grad():
        o = base.diffusion_model(inp["x"], inp["t"], context=inp["c_crossattn"], **conds)
    save_file({"out": o.float().contiguous()}, out)
    fam = mods["nodes.bridge"].model_family(base)
    print("RESULT " + json.dumps({"config": type(base.model_config).__name__,
                                  "family": getattr(fam, "name", None)}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
