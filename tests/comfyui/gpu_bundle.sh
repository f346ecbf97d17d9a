#!/usr/bin/env bash
# Build test-artifacts/gpu/ (gitignored): what the in-process checks need on a GPU machine that
# has CUDA torch, transformers, einops, safetensors, scipy... but no ComfyUI and no network.
# It holds a copy of the ComfyUI source from $COMFYUI_PATH (GPL: never commit it; the folder is
# ignored), the pure-Python torchsde/trampoline from $COMFYUI_PYTHON's site-packages, and
# stand-ins for av/torchvision/torchaudio used only when the machine lacks them.
#   bash tests/comfyui/gpu_bundle.sh                  # here
#   bash test-artifacts/gpu/run.sh                    # there (carry test-artifacts/gpu)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
G="$REPO/test-artifacts/gpu"
: "${COMFYUI_PATH:?set COMFYUI_PATH}" "${COMFYUI_PYTHON:?set COMFYUI_PYTHON}"
SP=$("$COMFYUI_PYTHON" -c "import torchsde, os; print(os.path.dirname(os.path.dirname(torchsde.__file__)))")
rm -rf "$G" && mkdir -p "$G/ComfyUI" "$G/site" "$G/stubs"
(cd "$COMFYUI_PATH" && tar cf - --exclude=.git --exclude=./models --exclude=./output \
  --exclude=./input --exclude=./temp --exclude=./user --exclude=./custom_nodes \
  --exclude=__pycache__ --exclude=./tests --exclude=./tests-unit .) | (cd "$G/ComfyUI" && tar xf -)
cp -r "$SP/torchsde" "$SP/trampoline" "$G/site/"
for m in av torchvision torchaudio; do
  mkdir -p "$G/stubs/$m/$m"
  cat >"$G/stubs/$m/$m/__init__.py" <<'PY'
# Stand-in for a package this GPU machine lacks; the checks never call it. Any use raises.
import sys, types
class _Missing(types.ModuleType):
    __path__ = []
    def __getattr__(self, k):
        if k.startswith("__"):
            raise AttributeError(k)
        m = _Missing(f"{self.__name__}.{k}")
        sys.modules[m.__name__] = m
        return m
    def __call__(self, *a, **k):
        raise NotImplementedError(f"{self.__name__} is unavailable here")
sys.modules[__name__].__class__ = _Missing
class _Loader:
    def create_module(self, spec):
        return _Missing(spec.name)
    def exec_module(self, module):
        pass
class _Finder:  # `import av.container` and the like resolve to stand-ins too
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == __name__ and name != __name__:
            import importlib.util
            return importlib.util.spec_from_loader(name, _Loader(), is_package=True)
sys.meta_path.insert(0, _Finder())
PY
done
cat >"$G/run.sh" <<'SH'
#!/usr/bin/env bash
# The in-process checks on the GPU (ComfyUI not in --cpu mode); prints two RESULT lines.
G=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$G/../.." && pwd)
PP="$G/site"
for m in av torchvision torchaudio; do
  python -c "import $m" 2>/dev/null || PP="$PP:$G/stubs/$m"
done
export PYTHONPATH="$PP"
python - <<PY
import sys; sys.path.insert(0, "$REPO")
from pathlib import Path
from tests.comfyui.tiny_checkpoint import write_tiny_sd15_checkpoint
from tests.comfyui.conftest import write_subject
write_tiny_sd15_checkpoint("$G/tiny_sd15.safetensors"); write_subject(Path("$G/subject"))
PY
cd "$G/ComfyUI"
export LORA2_COMFY_CPU=0
python "$REPO/tests/comfyui/inprocess_checks.py" sd15 "{\"tmp\": \"$G/tmp\", \"checkpoint\": \"$G/tiny_sd15.safetensors\", \"subject\": \"$G/subject\"}" 2>&1 | grep -v "lora key not loaded" | tail -20
python "$REPO/tests/comfyui/inprocess_checks.py" sdxl "{\"tmp\": \"$G/tmp2\"}" 2>&1 | grep -v "lora key not loaded" | tail -20
SH
chmod +x "$G/run.sh"
du -sh "$G"
