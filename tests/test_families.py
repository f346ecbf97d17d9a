"""Every family of the registry, through its tiny stand-in, without ComfyUI.

The tests iterate ``families.registry()``: a new family entry (and its stand-in) is picked up
here without edits: targets resolve, every key style round-trips to ``B Λ A`` read back with
plain safetensors (split parts stitched by rows), diffusers loads the diffusers-style file
(where the family has a diffusers class), the entropy capture finds its text→image attention,
and a short run trains. ``tests/comfyui/test_families.py`` repeats the ecosystem checks in
real ComfyUI (detection, stock LoraLoader).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lora2_engine import AdapterConfig, ExportConfig, attach, preset
from lora2_engine.denoiser import ModuleDenoiser
from lora2_engine.diffusion import train_diffusion
from lora2_engine.families import KEY_STYLES, TableNaming, get, registry
from lora2_engine.formats import adapters_to_lora, read_lora
from lora2_engine.formats.lora_file import export_adapters
from lora2_engine.models.loader import load_model
from lora2_engine.models.standin import load_stand_in
from tests.conftest import activate_slots

FAMILIES = sorted(registry())
STYLED = [(f, s) for f in FAMILIES for s in KEY_STYLES if s != "diffusers"
          or get(f).diffusers_class]


def _model(name: str):
    fam = get(name)
    return fam, load_stand_in(fam).build(seed=1)


def _conds(fam, stand_in, batch: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        ctx = torch.randn(77, stand_in.context_dim, generator=g)
        pooled = torch.randn(stand_in.pooled_dim, generator=g) if stand_in.pooled_dim else None
        out.append(fam.conditioning(ctx, pooled, 64, 64))
    return {k: torch.stack([o[k] for o in out]) for k in out[0]}


@pytest.mark.parametrize("name", FAMILIES)
def test_the_entry_is_complete_and_its_targets_exist(name):
    fam, model = _model(name)
    assert fam.targets and fam.display and fam.stand_in and fam.schedule and fam.conditioning
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for choice, want in (("attention", fam.targets), ("attention+mlp",
                                                      fam.targets + fam.targets_mlp)):
        ad = attach(model, AdapterConfig(targets=fam.resolve_targets(choice), init_rank=2))
        found = set(ad.layers)
        assert found <= linears
        assert {t for t in want if any(n.endswith("." + t) for n in found)} == set(want)
        ad.detach()


@pytest.mark.parametrize("name", FAMILIES)
def test_the_stand_in_runs_with_the_family_conditioning_and_schedule(name):
    fam, model = _model(name)
    stand_in = load_stand_in(fam)
    x = torch.randn(2, *stand_in.latent_shape)
    den = ModuleDenoiser(model, fam.schedule(), fam.cond_keys)
    with torch.no_grad():
        out = den(x, torch.tensor([0.5, 0.9]), **_conds(fam, stand_in, 2))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.std() > 1e-3


def _trained(model, fam, seed: int = 3):
    ad = attach(model, AdapterConfig(targets=fam.targets + fam.targets_mlp, r_target=2,
                                     init_rank=4, r_max=32))
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(ad.layers.values()):
        layer.resize(1 + i % 5)
        activate_slots(layer, g)
        layer.B.data.normal_(generator=g)
    return ad


def _file_delta(tensors: dict, prefix: str, style: str) -> torch.Tensor:
    down, up = (("lora_A", "lora_B") if style == "diffusers" else ("lora_down", "lora_up"))
    d = tensors[f"{prefix}.{down}.weight"].float().flatten(1)
    u = tensors[f"{prefix}.{up}.weight"].float().flatten(1)
    alpha = float(tensors[f"{prefix}.alpha"]) if f"{prefix}.alpha" in tensors else d.shape[0]
    return u @ d * (alpha / d.shape[0])


@pytest.mark.parametrize("name,style", STYLED)
def test_every_key_style_round_trips_to_B_Lambda_A(name, style, tmp_path):
    fam, model = _model(name)
    stand_in = load_stand_in(fam)
    ad = _trained(model, fam)
    layout = fam.model_layout(stand_in.unet_config(model))
    path = export_adapters(ad, tmp_path / "a.safetensors", ExportConfig(key_style=style),
                           layout)
    with safe_open(str(path), "pt") as fh:  # plain safetensors, not our reader
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        record = json.loads(fh.metadata()["lora2.modules"])
    seen: set[str] = set()
    for mod, layer in ad.layers.items():
        direct = (layer.B[:, :layer.rank] @ torch.diag(layer.slot_scale().detach())
                  @ layer.A[:layer.rank]).detach()
        parts = record[mod].get("split", [[record[mod]["key"], None]])
        rows = [_file_delta(tensors, key, style) for key, _ in parts]
        torch.testing.assert_close(torch.cat(rows), direct, atol=1e-6, rtol=1e-5)
        keys = {key for key, _ in parts}
        assert not keys & seen, f"{mod}: a key is used twice"
        seen |= keys
        if style == "comfy":
            assert keys == {f"diffusion_model.{mod}"} or name in ("sd15", "sdxl")
    lora = read_lora(path)
    assert lora.family() == name and lora.style == style
    assert set(lora.modules) == seen
    ad.detach()


@pytest.mark.parametrize("name", [f for f in FAMILIES
                                  if isinstance(get(f).naming, TableNaming)])
def test_kohya_names_follow_sd_scripts(name):
    """sd-scripts (``networks/lora_flux.py`` etc.): ``lora_unet_`` + the module path, . → _."""
    fam, model = _model(name)
    ad = _trained(model, fam)
    lora = adapters_to_lora(ad, ExportConfig(key_style="kohya"), fam.model_layout())
    assert set(lora.modules) == {"lora_unet_" + n.replace(".", "_") for n in ad.layers}
    assert lora.metadata["ss_base_model_version"] == fam.kohya_version[0]
    ad.detach()


DIFFUSERS = [f for f in FAMILIES if get(f).diffusers_class]


@pytest.mark.parametrize("name", DIFFUSERS)
def test_diffusers_loads_the_diffusers_style_file_exactly(name, tmp_path):
    fam = get(name)
    stand_in = load_stand_in(fam)
    if stand_in.diffusers_model is None:
        pytest.skip(stand_in.why_not.get("diffusers", "no diffusers twin of the stand-in"))
    pytest.importorskip("peft", reason="diffusers needs peft to load LoRA files")
    _, model = _model(name)
    ad = _trained(model, fam)
    path = export_adapters(ad, tmp_path / "d.safetensors", ExportConfig(key_style="diffusers"),
                           fam.model_layout(stand_in.unet_config(model)))
    lora = read_lora(path)
    twin = stand_in.diffusers_model(model)
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    _load_into(twin, path)
    after = twin.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    prefix = fam.diffusers_component + "."
    for key, w in lora.modules.items():
        weight = key.removeprefix(prefix) + ".weight"
        torch.testing.assert_close(after[weight] - before[weight], w.delta(), atol=1e-5,
                                   rtol=1e-4)
    assert changed == {k.removeprefix(prefix) + ".weight" for k in lora.modules}
    assert len(set(lora.ranks().values())) > 1  # per-module ranks survived diffusers


def _load_into(model, path):
    """diffusers' own ``load_lora_weights`` on a pipeline holding only this transformer, then
    ``fuse_lora`` at scale 1 (the weights then carry exactly the update diffusers applies)."""
    import inspect

    import diffusers

    pipe_cls = getattr(diffusers, type(model).__name__.replace("Transformer2DModel", "Pipeline"))
    parts = {n: None for n in inspect.signature(pipe_cls.__init__).parameters if n != "self"}
    pipe = pipe_cls(**{**parts, "transformer": model})
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()


@pytest.mark.parametrize("name", FAMILIES)
def test_the_entropy_capture_finds_text_to_image_attention(name):
    fam, model = _model(name)
    if fam.entropy is None:
        pytest.skip(f"{fam.display} has no text→image attention: λ_e > 0 is refused")
    stand_in = load_stand_in(fam)
    cap = fam.entropy(model)
    with torch.no_grad():
        den = ModuleDenoiser(model, fam.schedule(), fam.cond_keys)
        den(torch.randn(1, *stand_in.latent_shape), torch.tensor([0.5]),
            **_conds(fam, stand_in))
    assert cap.num_layers > 0 and len(cap.values) == cap.num_layers
    h = float(cap.mean())
    assert 0 < h <= torch.log(torch.tensor(77.0)) + 1e-4  # at most uniform over 77 tokens
    cap.remove()


@pytest.mark.parametrize("name", FAMILIES)
def test_a_short_run_trains_the_same_with_and_without_checkpointing(name):
    bundle = load_model(f"tiny-{name}")
    g = torch.Generator().manual_seed(0)
    examples = bundle.encode([torch.rand(3, 64, 64, generator=g) for _ in range(2)],
                             ["a photo of sks dog"] * 2)
    results = []
    for ckpt in (False, True):
        a_cfg, t_cfg = preset("spread", steps=3, init_rank=3, lr=1e-3, nu_lr=0.3,
                              targets=bundle.family.targets, grad_checkpointing=ckpt)
        results.append(train_diffusion(bundle.denoiser, examples, bundle.family, a_cfg, t_cfg,
                                       layout=bundle.layout))
    plain, ckpt = results
    assert plain.ranks == ckpt.ranks
    for k, w in plain.lora.modules.items():
        torch.testing.assert_close(w.up, ckpt.lora.modules[k].up, atol=1e-6, rtol=1e-5)
    assert any(w.up.abs().max() > 0 for w in plain.lora.modules.values())
    assert all(h["entropy"] > 0 for h in plain.history)  # λ_e on: the term is measured


@pytest.mark.parametrize("name", FAMILIES)
def test_ranks_differ_per_component_after_a_short_run_on_a_planted_teacher(name):
    """A teacher copy carries rank-8 updates on every other default target; the student's
    LoRA² (spread preset, λ_e 0) fits it: the loss falls and the learned ranks spread out."""
    import copy

    from lora2_engine.trainer import Trainer, collate

    fam, student = _model(name)
    stand_in = load_stand_in(fam)
    teacher = copy.deepcopy(student)
    g = torch.Generator().manual_seed(0)
    names = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)
             and any(n == t or n.endswith("." + t) for t in fam.targets)]
    with torch.no_grad():
        for n in names[::2]:
            w = teacher.get_submodule(n).weight
            delta = torch.randn(w.shape[0], 8, generator=g) @ torch.randn(8, w.shape[1],
                                                                          generator=g)
            w += 0.5 * delta / delta.norm() * w.norm()
    sched = fam.schedule()
    ours, theirs = (ModuleDenoiser(m, sched, fam.cond_keys) for m in (student, teacher))
    data = [{"x": torch.randn(*stand_in.latent_shape, generator=g),
             **{k: v[0] for k, v in _conds(fam, stand_in, 1, seed=i).items()}}
            for i in range(8)]
    with torch.no_grad():
        b = collate(data)
        conds = {k: v for k, v in b.items() if k != "x"}
        sigma = torch.full((8,), 0.5)
        kappa = 1 / float((ours(b["x"], sigma, **conds) - theirs(b["x"], sigma, **conds))
                          .pow(2).mean())

    def loss(batch, gen):
        sigma = torch.rand(batch["x"].shape[0], generator=gen) * 0.8 + 0.1
        conds = {k: v for k, v in batch.items() if k != "x"}
        with torch.no_grad():
            want = theirs(batch["x"], sigma, **conds)
        return kappa * torch.nn.functional.mse_loss(ours(batch["x"], sigma, **conds), want)

    a_cfg, t_cfg = preset("spread", steps=40, init_rank=4, lr=3e-3, nu_lr=5e-2, batch_size=2,
                          lambda_e=0.0, targets=fam.targets)
    adapters = attach(student, a_cfg)
    history = Trainer(adapters, loss, data, t_cfg).run()
    ranks = adapters.ranks()
    assert history[-1]["task"] < 0.8 * history[0]["task"]
    assert len(set(ranks.values())) >= 3, ranks
    adapters.detach()


@pytest.mark.parametrize("names,unet_config,want", [
    (["SD15", "BASE"], {}, "sd15"),
    (["KOALA_700M", "SDXL", "BASE"], {}, "sdxl"),
    (["FluxSchnell", "Flux", "BASE"], {"image_model": "flux"}, "flux"),
    (["Chroma", "BASE"], {"image_model": "chroma"}, "flux"),
    (["Flux2", "Flux", "BASE"], {"image_model": "flux2"}, None),  # other blocks: no entry yet
    (["SD3", "BASE"], {}, None),
    (["SD20", "BASE"], {}, None)])
def test_comfyui_detection_maps_to_entries(names, unet_config, want):
    from lora2_engine.families import from_comfy

    got = from_comfy(names, unet_config)
    assert (got.name if got else None) == want


@pytest.mark.parametrize("name,style,ok", [("sd15", "diffusers", False), ("sdxl", "kohya", True),
                                           ("flux", "diffusers", True)])
def test_key_styles_stock_comfyui_cannot_load_are_refused_in_comfyui(name, style, ok):
    fam = get(name)
    if ok:
        fam.check_key_style(style, in_comfyui=True)
    else:
        with pytest.raises(ValueError, match="stock ComfyUI does not load these names"):
            fam.check_key_style(style, in_comfyui=True)
