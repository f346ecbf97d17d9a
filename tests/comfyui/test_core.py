"""The ComfyUI-free glue of the nodes (``nodes/core.py``): runs without ComfyUI.

The noise schedules below are textbook stand-ins written for these tests (the same formulas
as ComfyUI's EPS / V_PREDICTION / CONST / X0 parameterisations); the in-process ComfyUI test
repeats the loss check against ComfyUI's own classes.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn

from .conftest import PACK, write_subject


class StandInSampling:
    """sigma schedule + parameterisation with ComfyUI's method names, sigma_data = 1."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "flow":
            self.sigmas = torch.linspace(0.001, 1.0, 1000)
        else:
            betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
            ac = torch.cumprod(1 - betas, 0)
            self.sigmas = ((1 - ac) / ac).sqrt().float()

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def percent_to_sigma(self, p: float) -> float:
        if p <= 0:
            return 999999999.9
        if p >= 1:
            return 0.0
        return float(self.sigmas[round((1 - p) * 999)])

    def timestep(self, sigma):
        sigmas = self.sigmas.to(sigma.device)
        return (sigma[:, None] - sigmas[None]).abs().argmin(1).float()

    @staticmethod
    def _v(s, like):
        return s.view(s.shape[:1] + (1,) * (like.ndim - 1))

    def calculate_input(self, sigma, x):
        return x if self.kind == "flow" else x / (self._v(sigma, x) ** 2 + 1) ** 0.5

    def noise_scaling(self, sigma, noise, x0, max_denoise=False):
        s = self._v(sigma, noise)
        if self.kind == "flow":
            return s * noise + (1 - s) * x0
        return x0 + noise * ((1 + s**2) ** 0.5 if max_denoise else s)

    def calculate_denoised(self, sigma, out, x):
        s = self._v(sigma, out)
        if self.kind == "v":
            return x / (s**2 + 1) - out * s / (s**2 + 1) ** 0.5
        if self.kind == "x0":
            return out
        return x - out * s

    def target(self, sigma, noise, x0):
        """The regression target of the raw output, written independently of the code."""
        s = self._v(sigma, noise)
        return {"eps": noise, "v": (noise - s * x0) / (s**2 + 1) ** 0.5,
                "flow": noise - x0, "x0": x0}[self.kind]


# ------------------------------------------------------------------ names and files
@pytest.mark.parametrize("name", ["../evil", "a/../../b", "/etc/passwd", "~/x", "C:\\x",
                                  "a//b", "./a", "", "  ", "bad|name", "a/b\x00c"])
def test_unsafe_names_are_refused(core, name):
    with pytest.raises(ValueError):
        core.safe_relative_name(name)


@pytest.mark.parametrize("name,expected", [("subject", "subject.safetensors"),
                                           ("lora2/my dog", "lora2/my dog.safetensors"),
                                           ("x.safetensors", "x.safetensors"),
                                           ("lora2\\win", "lora2/win.safetensors")])
def test_safe_names_are_kept(core, name, expected):
    assert str(core.safe_relative_name(name)) == expected


def test_free_path_with_a_double_suffix(core, tmp_path):
    (tmp_path / "run.state.safetensors").write_bytes(b"x")
    assert core.free_path(tmp_path, "run", ".state.safetensors").name == \
        "run_2.state.safetensors"
    assert str(core.safe_relative_name("a.state.safetensors", ".state.safetensors")) == \
        "a.state.safetensors"


def test_free_path_never_overwrites(core, tmp_path):
    first = core.free_path(tmp_path, "lora2/dog")
    assert first == tmp_path / "lora2" / "dog.safetensors"
    first.parent.mkdir(parents=True)
    first.write_bytes(b"x")
    second = core.free_path(tmp_path, "lora2/dog")
    assert second.name == "dog_2.safetensors" and first.read_bytes() == b"x"


def test_lora_state_dict_is_what_the_file_holds(core, tmp_path):
    from safetensors.torch import load_file

    formats = importlib.import_module(f"{PACK}.lora2_engine.formats")
    mods = {"lora_unet_a": formats.ModuleWeights(torch.randn(3, 8), torch.randn(5, 3), 3.0),
            "lora_unet_b": formats.ModuleWeights(torch.randn(1, 4), torch.randn(4, 1), 1.0)}
    for style in ("kohya", "diffusers"):
        lora = formats.LoraFile(mods, style, {"k": "v"})
        path = formats.write_lora(lora, tmp_path / f"{style}.safetensors")
        on_disk, ours = load_file(path), core.lora_state_dict(lora)
        alphas = {k for k in ours if k.endswith(".alpha")}
        assert set(on_disk) == (set(ours) if style == "kohya" else set(ours) - alphas)
        assert all(torch.equal(on_disk[k], ours[k]) for k in on_disk)
        assert {float(ours[k]) for k in alphas} == {3.0, 1.0}


def test_peft_names_are_renamed_to_names_comfyui_maps(core):
    known = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q",
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out",
             "lora_unet_x"}
    p = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    sd = {p + "to_q.lora_A.weight": 1, p + "to_q.alpha": 2, p + "to_out.0.lora_B.weight": 3,
          "lora_unet_x.lora_up.weight": 4, p + "to_v.lora_A.weight": 5}
    assert core.match_peft_names(sd, known) == {
        p + "processor.to_q.lora_A.weight": 1, p + "processor.to_q.alpha": 2,
        p + "processor.to_out.lora_B.weight": 3, "lora_unet_x.lora_up.weight": 4,
        p + "to_v.lora_A.weight": 5}  # unknown either way: left for ComfyUI to report


# ------------------------------------------------------------------ subjects
def test_subject_folder_keeps_good_images_and_names_bad_ones(core, tmp_path):
    folder = write_subject(tmp_path / "s")
    subject = core.subject_from_folder(folder, "a photo of sks dog", 64, "crop")
    assert subject.names == ["img0.png", "img1.png", "img2.png"]
    assert subject.captions[1] == "a photo of sks dog, sitting"
    assert subject.captions[0] == "a photo of sks dog"
    assert any("broken.jpg" in w for w in subject.warnings)
    assert all(p.shape == (3, 64, 64) for p in subject.pixels)
    batch = core.to_image_batch(subject.pixels)
    assert batch.shape == (3, 64, 64, 3) and 0 <= batch.min() and batch.max() <= 1


def test_subject_folder_without_images_is_a_clear_error(core, tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.jpg").write_bytes(b"no")
    with pytest.raises(ValueError, match="x.jpg"):
        core.subject_from_folder(tmp_path / "e", "p", 64, "crop")


def test_subject_from_image_batch(core):
    images = torch.rand(2, 70, 90, 4)
    subject = core.subject_from_images(images, "a photo of sks cat", 64, "bucket")
    assert len(subject.pixels) == 2 and subject.captions == ["a photo of sks cat"] * 2
    assert subject.pixels[0].shape[0] == 3 and subject.pixels[0].shape[1] % 64 == 0


def test_examples_are_made_stackable(core):
    exs = [{"latents": torch.zeros(4, 8, 8), "c_crossattn": torch.randn(77, 8)},
           {"latents": torch.zeros(4, 8, 8), "c_crossattn": torch.randn(154, 8)}]
    out = core.stackable(exs, 2)
    assert {e["c_crossattn"].shape[0] for e in out} == {154}
    assert torch.equal(out[0]["c_crossattn"][77:], out[0]["c_crossattn"][:77])
    mixed = [{"latents": torch.zeros(4, 8, 8)}, {"latents": torch.zeros(4, 8, 12)}]
    assert core.stackable(mixed, 1) == mixed
    with pytest.raises(ValueError, match="batch_size"):
        core.stackable(mixed, 2)


# ------------------------------------------------------------------ the loss
@pytest.mark.parametrize("kind", ["eps", "v", "flow", "x0"])
def test_denoising_loss_is_mse_on_the_native_target(core, kind):
    ms = StandInSampling(kind)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) / 2

    def raw(x):  # any fixed "network"
        return torch.tanh(torch.einsum("oc,bchw->bohw", w, x))

    def apply_model(x, sigma, c_crossattn=None):
        assert c_crossattn is not None
        return ms.calculate_denoised(sigma, raw(ms.calculate_input(sigma, x)), x)

    x0 = torch.randn(3, 4, 8, 8)
    batch = {"latents": x0, "c_crossattn": torch.zeros(3, 77, 8)}
    got = core.denoising_loss(apply_model, ms)(batch, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws, then the textbook target
    sigma = core.sample_sigmas(ms, 3, g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = ms.noise_scaling(sigma, noise, x0)
    want = torch.nn.functional.mse_loss(raw(ms.calculate_input(sigma, x_t)),
                                        ms.target(sigma, noise, x0))
    assert torch.allclose(got, want, rtol=2e-4, atol=1e-6), (float(got), float(want))


def test_sampled_sigmas_stay_in_the_schedule(core):
    ms = StandInSampling("eps")
    s = core.sample_sigmas(ms, 4000, torch.Generator().manual_seed(0))
    assert float(s.min()) >= float(ms.sigma_min) and float(s.max()) <= float(ms.sigma_max)
    expected = float((ms.sigmas < 1).float().mean())  # uniform over the 1000 timesteps
    assert math.isclose(float((s < 1).float().mean()), expected, abs_tol=0.03)


def test_euler_preview_runs_from_noise_to_an_estimate(core):
    ms = StandInSampling("eps")

    def apply_model(x, sigma, **_):
        return ms.calculate_denoised(sigma, torch.zeros_like(x), x) * 0  # predicts x0 = 0

    out = core.euler_sample(apply_model, ms, {}, (1, 4, 8, 8), 5, seed=0)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and out.abs().max() < 1e-4


# ------------------------------------------------------------------ torch plumbing
@pytest.mark.parametrize("moved", [False, True], ids=["as-loaded", "moved-after"])
def test_inference_tensors_are_released_for_training(core, moved):
    with torch.inference_mode():
        net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    if moved:  # ComfyUI moving a loaded model to the GPU: is_inference() is False afterwards,
        net.to(torch.float64).to(torch.float32)  # but there is still no version counter
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        net(x).sum().backward()
    assert core.release_inference_tensors(net) == 6
    net(x).sum().backward()  # works now
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert core.release_inference_tensors(net) == 0


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.input_blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.GELU())
                                          for _ in range(3))
        self.out = nn.Linear(6, 1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) / 3

    def forward(self, x, scale=1.0):
        for b in self.input_blocks:
            x = b(x) * scale
        return self.out(x)


def test_checkpointed_blocks_give_the_same_gradients_and_undo(core):
    net, x = _Blocks(), torch.randn(5, 6)
    plain = torch.autograd.grad(net(x, scale=0.5).sum(), list(net.parameters()))
    with core.checkpointed_blocks(net) as wrapped:
        assert len(wrapped) == 3
        ckpt = torch.autograd.grad(net(x, scale=0.5).sum(), list(net.parameters()))
    assert all(torch.allclose(a, b) for a, b in zip(plain, ckpt))
    assert all("forward" not in vars(b) for b in net.input_blocks)


DEVICES = [pytest.param("cpu", torch.float32, id="cpu-fp32"),
           pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.skipif(
               not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device,dtype", DEVICES)
def test_train_adapters_trains_exports_and_leaves_the_model_as_it_was(core, tmp_path, device,
                                                                      dtype):
    """On a GPU the weights are fp16 (as ComfyUI loads them there); adapters stay fp32."""
    tiny = importlib.import_module(f"{PACK}.lora2_engine.models.tiny")
    keys = importlib.import_module(f"{PACK}.lora2_engine.formats.keys")
    config = importlib.import_module(f"{PACK}.lora2_engine.config")
    with torch.inference_mode():  # as a MODEL loaded by an upstream ComfyUI node
        unet = tiny.build_unet("sd15", seed=0).to(device, dtype)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    modules = {n: id(m) for n, m in unet.named_modules()}
    ms = StandInSampling("eps")

    def apply_model(x, sigma, c_crossattn):
        out = unet(ms.calculate_input(sigma, x).to(dtype), ms.timestep(sigma),
                   c_crossattn.to(dtype)).float()
        return ms.calculate_denoised(sigma, out, x)

    g = torch.Generator().manual_seed(0)
    examples = [{"latents": torch.randn(4, 8, 8, generator=g).to(device),
                 "c_crossattn": torch.randn(77, 768, generator=g).to(device)}
                for _ in range(2)]
    adapter_cfg, train_cfg = core.build_configs("spread", {"steps": 2, "init_rank": 2,
                                                           "lr": 1e-3})
    layout = keys.UNetLayout("sd15", (1,), True)
    result = core.train_adapters(unet, examples, core.denoising_loss(apply_model, ms),
                                 adapter_cfg, train_cfg, config.ExportConfig(), layout,
                                 out_file=tmp_path / "out.safetensors", checkpointing=True)
    assert len(result.history) == 2 and math.isfinite(result.history[-1]["loss"])
    assert len(result.lora.modules) == 32  # 4 transformers x (attn1, attn2) x q/k/v/out
    assert all(torch.isfinite(w.down).all() and torch.isfinite(w.up).all()
               for w in result.lora.modules.values())
    assert any(w.up.abs().max() > 0 for w in result.lora.modules.values())  # it learned
    assert all(k.startswith("lora_unet_") for k in result.lora.modules)
    assert {n: id(m) for n, m in unet.named_modules()} == modules
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_build_configs_names_the_bad_option(core):
    with pytest.raises(ValueError, match="r_target"):
        core.build_configs("spread", {"r_target": -3.0})
    a, t = core.build_configs("paper", {"lr": None, "targets": "to_q, to_k"})
    assert a.targets == ("to_q", "to_k") and t.lr == 5e-5
