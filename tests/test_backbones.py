"""Backbones: the contract, how a model finds its backbone, v-prediction in the sampler, and the
SDXL backbone on a tiny random SDXL-shaped pipeline (all checked against diffusers' own code)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gooddrag.core.backbone import ModelFiles, read_model, select_backbone
from gooddrag.core.ddim import DDIM, PREDICTION_TYPES
from gooddrag.core.editor import Editor
from gooddrag.core.engine import Reference
from gooddrag.core.errors import ConfigError, ModelNotFoundError
from gooddrag.core.registry import default_registry
from gooddrag.plugins.backbones.tiny_pipeline import sd_ddim_scheduler, tiny_pipeline_dir
from gooddrag.testing import check_backbone, check_component, random_image
from gooddrag.testing.tiny_sd2 import tiny_sd2_pipeline_dir
from gooddrag.testing.tiny_sdxl import tiny_sdxl_pipeline_dir

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "backbone-package"
EDIT_KW = dict(width=32, lora="off", overrides=["schedule.num_inference_steps=10", "schedule.drag_timesteps=2",
                                                "schedule.drags_per_timestep=1"])


# --- the sampler reads the model's prediction type, as diffusers does --------------------------------

@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_step_inversion_and_x0_equal_diffusers(prediction_type):
    from diffusers import DDIMInverseScheduler

    sched = sd_ddim_scheduler(prediction_type)
    sched.set_timesteps(10)
    inverse = DDIMInverseScheduler.from_config(sched.config)
    inverse.set_timesteps(10)
    ours = DDIM(sched.alphas_cumprod, 10, 1000, 1, prediction_type)
    assert ours.timesteps == sched.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    # float64 tensors, so the float32 rounding of the tensors does not hide a formula that differs;
    # diffusers still rounds its coefficients (1 - a, sqrt) in float32 (~6e-8 relative), which on
    # x0 at t=901 (|x0| ~ 30) is ~2e-6 absolute: hence 1e-6 absolute plus 1e-6 relative
    for t in ours.timesteps:
        z, pred = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
        ref = sched.step(pred, t, z, eta=0.0)
        assert torch.allclose(ours.step(z, pred, t), ref.prev_sample, atol=1e-6, rtol=1e-6)
        assert torch.allclose(ours.predict_x0(z, pred, t), ref.pred_original_sample, atol=1e-6, rtol=1e-6)
        inv = inverse.step(pred, t, z).prev_sample  # from t - stride up to t
        assert torch.allclose(ours.invert_step(z, pred, t), inv, atol=1e-6, rtol=1e-6)


def test_v_prediction_is_not_read_as_noise():
    """The same model output steps differently under the two readings (the bug this guards against)."""
    sched = sd_ddim_scheduler()
    z, pred = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    eps = DDIM(sched.alphas_cumprod, 10).step(z, pred, 701)
    v = DDIM(sched.alphas_cumprod, 10, prediction_type="v_prediction").step(z, pred, 701)
    assert (eps - v).abs().max() > 0.1


def test_lora_target_is_what_diffusers_trains_against():
    """The LoRA's q(z_t | x0) and its target (noise, or v) equal the scheduler's add_noise/get_velocity."""
    sched = sd_ddim_scheduler("v_prediction")
    ddim = DDIM(sched.alphas_cumprod, 1, prediction_type="v_prediction")
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 999])
    assert torch.allclose(ddim.add_noise(x0, eps, t), sched.add_noise(x0, eps, t), atol=1e-6)
    assert torch.allclose(ddim.target(x0, eps, t), sched.get_velocity(x0, eps, t), atol=1e-6)


# --- which backbone takes a model ------------------------------------------------------------------

def test_backbone_is_chosen_from_the_model_files():
    reg = default_registry()
    assert select_backbone(reg, "tiny-random")[0].name == "tiny-random"
    cls, files = select_backbone(reg, str(tiny_sd2_pipeline_dir()))
    assert cls.name == "stable-diffusion" and files.prediction_type == "v_prediction"
    cls, files = select_backbone(reg, str(tiny_sdxl_pipeline_dir()))
    assert cls.name == "stable-diffusion-xl" and files.pipeline_class == "StableDiffusionXLPipeline"
    # an explicit name wins over the files
    assert select_backbone(reg, str(tiny_sdxl_pipeline_dir()), "stable-diffusion")[0].name == "stable-diffusion"


def test_what_is_read_before_loading():
    """The model's own configs say its pipeline, prediction type and width; claims read them."""
    from gooddrag.core.backbone import model_width

    reg = default_registry()
    files = read_model(str(tiny_sd2_pipeline_dir()))
    assert (files.source, files.pipeline_class, files.prediction_type) == ("folder", "StableDiffusionPipeline",
                                                                           "v_prediction")
    assert files.sample_width(512) == 64 == model_width(reg, str(tiny_sd2_pipeline_dir()))  # sample size 8 x 8
    assert model_width(reg, "tiny-random") == 512
    sd, sdxl = reg.get("backbone", "stable-diffusion"), reg.get("backbone", "stable-diffusion-xl")
    real_sd21 = ModelFiles("x", "hub", "StableDiffusionPipeline", unet={"sample_size": 96},
                           vae={"block_out_channels": [128, 256, 512, 512]})
    assert sd.claims(real_sd21) and not sdxl.claims(real_sd21) and real_sd21.sample_width(512) == 768
    inpaint = ModelFiles("x", "hub", "StableDiffusionPipeline", unet={"in_channels": 9})
    refiner = ModelFiles("x", "hub", "StableDiffusionXLImg2ImgPipeline")
    assert not any(cls.claims(f) for cls in (sd, sdxl) for f in (inpaint, refiner))


def _configs_only(tmp_path: Path, source: Path, changes: dict) -> Path:
    """A model folder with the configs of ``source`` (no weights), edited."""
    out = tmp_path / "model"
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / rel, out / rel)
    for rel, (key, value) in changes.items():
        path = out / rel
        data = json.loads(path.read_text())
        data[key] = value
        path.write_text(json.dumps(data))
    return out


def test_unknown_pipeline_class_is_one_line_naming_what_was_read(tmp_path):
    folder = _configs_only(tmp_path, tiny_pipeline_dir(), {"model_index.json": ("_class_name", "FluxPipeline")})
    with pytest.raises(ConfigError) as exc:
        Editor.from_pretrained(str(folder), device="cpu")
    msg = str(exc.value)
    assert "\n" not in msg and "FluxPipeline" in msg and "model_index.json" in msg
    assert "stable-diffusion, stable-diffusion-xl, tiny-random" in msg and "--backbone" in msg


def test_unsupported_prediction_type_is_refused_before_loading(tmp_path):
    # a folder without weights: a load attempt would fail with ModelNotFoundError, not this
    folder = _configs_only(tmp_path, tiny_pipeline_dir(),
                           {"scheduler/scheduler_config.json": ("prediction_type", "sample")})
    with pytest.raises(ConfigError) as exc:
        Editor.from_pretrained(str(folder), device="cpu")
    msg = str(exc.value)
    assert "\n" not in msg and "'sample'" in msg and "epsilon or v_prediction" in msg


def test_uncached_hub_model_offline_is_one_line():
    with pytest.raises(ModelNotFoundError) as exc:
        Editor.from_pretrained("nobody-here/no-such-model", device="cpu")
    assert "hf download nobody-here/no-such-model" in str(exc.value) and "\n" not in str(exc.value)


# --- a third-party backbone claims its own models ----------------------------------------------------

@pytest.fixture
def fixture_backbone_installed(tmp_path, monkeypatch):
    """The fixture package as an installed distribution (a dist-info with its entry point)."""
    dist = tmp_path / "gooddrag_fixture_backbone-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gooddrag-fixture-backbone\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[gooddrag]\nfixture-backbone = gooddrag_fixture_backbone\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(FIXTURE))
    default_registry.cache_clear()
    yield
    default_registry.cache_clear()


def test_third_party_backbone_claims_its_own_models(fixture_backbone_installed, tmp_path):
    reg = default_registry()
    assert reg.owner("backbone", "fixture-toy") == "fixture-backbone"
    cls = reg.get("backbone", "fixture-toy")
    check_component("backbone", cls)
    assert select_backbone(reg, "fixture-toy/small")[0] is cls  # an id no built-in reads
    folder = tmp_path / "toy-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FixtureToyPipeline"}))
    assert select_backbone(reg, str(folder))[0] is cls
    assert select_backbone(reg, str(tiny_sdxl_pipeline_dir()))[0].name == "stable-diffusion-xl"  # not taken
    editor = Editor.from_pretrained("fixture-toy/small", device="cpu", registry=reg)
    check_backbone(editor.backbone)
    res = editor.edit(random_image(32, 32), [((8, 8), (20, 20))], **EDIT_KW)
    assert res.report["config"]["model"] == "fixture-toy/small" and res.image.size == (32, 32)


def test_a_backbone_missing_part_of_the_contract_is_one_line():
    from gooddrag.testing import ToyBackbone

    class Partial(ToyBackbone):
        name = "partial"
        supports_low_memory = True  # promises set_low_memory, which it does not have
        decode = None

    with pytest.raises(ConfigError) as exc:
        Editor(Partial())
    assert "method decode()" in str(exc.value) and "set_low_memory() (it sets supports_low_memory)" in str(exc.value)


# --- SD 2.x (v-prediction) and SDXL on tiny random pipelines ------------------------------------------

@pytest.fixture(scope="module")
def sd2_editor():
    return Editor.from_pretrained(str(tiny_sd2_pipeline_dir()), device="cpu")


@pytest.fixture(scope="module")
def sdxl_editor():
    return Editor.from_pretrained(str(tiny_sdxl_pipeline_dir()), device="cpu")


@pytest.fixture(scope="module", params=["sd2", "sdxl"])
def editor(request, sd2_editor, sdxl_editor):
    return {"sd2": sd2_editor, "sdxl": sdxl_editor}[request.param]


def test_backbones_meet_the_contract(editor, tiny_backbone):
    check_backbone(editor.backbone)
    check_backbone(tiny_backbone)


def test_width_defaults_to_the_models_own(sd2_editor, sdxl_editor):
    # both tiny UNets have sample size 8 (SD2.1's is 96 -> 768 px, SDXL's 128 -> 1024 px)
    assert sd2_editor.backbone.default_width == 64 and sdxl_editor.backbone.default_width == 64
    assert sd2_editor.backbone.sampler(10).prediction_type == "v_prediction"
    res = sd2_editor.edit(random_image(48, 32), [((8, 8), (20, 20))], **{**EDIT_KW, "width": None})
    assert res.report["working_size"] == [64, 40] and res.report["config"]["width"] == 64


def _pipeline_ddim(backbone):
    """The backbone's own diffusers pipeline (same components), sampling with DDIM as ours does."""
    from diffusers import DDIMScheduler

    pipe = backbone.pipe
    return type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(
        pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)})


def test_zero_drag_steps_reproduce_diffusers_ddim_sampling(editor):
    """From the same latent: our reference trajectory (plain DDIM) and our finish (mutual
    self-attention with both branches equal) end where the diffusers pipeline's DDIM sampling does."""
    b = editor.backbone
    b.set_prompt("a photo of a cat")
    z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pipe = _pipeline_ddim(b)
    with torch.no_grad():
        theirs = pipe(prompt="a photo of a cat", latents=z_T.clone(), num_inference_steps=10, guidance_scale=1.0,
                      height=64, width=64, output_type="latent").images
    ddim = b.sampler(10)
    ref = Reference(b, z_T, list(range(10)), ddim.timesteps)
    assert (ref.latents[10] - theirs).abs().max() <= 1e-5
    z_ref = z = z_T
    with torch.no_grad():
        for t in ddim.timesteps:
            e_ref, e = b.eps_mutual(z_ref, z, t)
            z_ref, z = ddim.step(z_ref, e_ref, t), ddim.step(z, e, t)
    assert (z - theirs).abs().max() <= 1e-5 and (z_ref - theirs).abs().max() <= 1e-5
    b.set_prompt("")


@pytest.mark.parametrize("prompt", ["", "a photo of a cat sitting on a wooden table"])
def test_sdxl_unet_inputs_equal_the_pipelines(sdxl_editor, prompt):
    b = sdxl_editor.backbone
    b.set_prompt(prompt)
    pipe = b.pipe
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=b.device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    assert torch.equal(b.text_embedding(1), embeds) and embeds.shape == (1, 77, 16 + 32)
    assert torch.equal(b.pooled_embedding(1), pooled) and pooled.shape == (1, 32)
    time_ids = pipe._get_add_time_ids((64, 48), (0, 0), (64, 48), dtype=embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(b.time_ids((8, 6)), time_ids)  # latent (8, 6) = 64 x 48 px (H, W)
    assert b.scaling == 0.13025  # the VAE config's, not SD1.5's 0.18215
    b.set_prompt("")


@pytest.mark.parametrize("which", ["sd2", "sdxl"])
def test_lora_trains_on_the_models_conditioning_and_target(which, sd2_editor, sdxl_editor):
    """The per-image LoRA trains through the SDXL conditioning (pooled embedding, time ids) and
    against v for the v-prediction model; its weights change the UNet; it is cached for the next edit."""
    editor = {"sd2": sd2_editor, "sdxl": sdxl_editor}[which]
    kw = {**EDIT_KW, "lora": "auto", "overrides": EDIT_KW["overrides"] + [
        "lora.steps=1", "lora.crop=32", "lora.batch_size=1", "lora.rank=2", "lora.fuse=false",
        "schedule.drag_timesteps=1"]}
    image = random_image(32, 32, seed=4)
    first = editor.edit(image, [((8, 8), (20, 20))], **kw)
    assert first.report["lora"].startswith("trained")
    lora = {n: q for n, q in editor.backbone.unet.named_parameters() if "lora_B" in n}
    assert lora and any(float(q.abs().max()) > 0 for q in lora.values())  # B starts at zero: it trained
    again = editor.edit(image, [((8, 8), (20, 20))], **kw)
    assert again.report["lora"].startswith("cached") and again.image.tobytes() == first.image.tobytes()


SHORT = {"gooddrag": ["schedule.drag_timesteps=1", "schedule.drags_per_timestep=1"],
         "dragdiffusion": ["schedule.steps=2"], "instant": [],
         "instant-refine": ["schedule.drag_timesteps=1", "schedule.drags_per_timestep=1"]}


@pytest.mark.parametrize("preset", list(SHORT))
def test_cli_edits_the_tiny_sdxl_and_sd2_end_to_end(preset, img, tmp_path, capsys):
    """Every preset (schedules, losses, trackers, the warp) runs unchanged on both backbones, chosen
    from the model folder's files with no flag."""
    from gooddrag.app import cli

    for name, folder, backbone in (("sdxl", tiny_sdxl_pipeline_dir(), "stable-diffusion-xl"),
                                   ("sd2", tiny_sd2_pipeline_dir(), "stable-diffusion")):
        out = tmp_path / name
        code = cli.main(["edit", str(img), "--points", "8,8:30,20", "--model", str(folder), "--preset", preset,
                         "--lora", "off", "--width", "32", "-p", "schedule.num_inference_steps=10",
                         *[x for kv in SHORT[preset] for x in ("-p", kv)], "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        run = json.loads((out / "run.json").read_text())
        assert run["config"]["model"] == str(folder) and (out / "result.png").is_file()
        assert run["config"]["preset"] == preset and run["config"]["backbone"] == backbone  # no --backbone


# --- single-file checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_checkpoint_loads_offline_with_a_local_config(arch, tmp_path):
    """An original-layout .safetensors (as fine-tunes are shared) plus the base model's diffusers
    folder: the backbone is chosen from the file's tensor names and every weight is the folder's."""
    from gooddrag.testing import load_tiny_pipeline
    from gooddrag.testing.single_file import write_single_file
    from gooddrag.testing.tiny_sdxl import load_tiny_sdxl_pipeline

    name = {"sd15": "stable-diffusion", "sdxl": "stable-diffusion-xl"}[arch]
    folder = {"sd15": tiny_pipeline_dir(), "sdxl": tiny_sdxl_pipeline_dir()}[arch]
    pipe = {"sd15": load_tiny_pipeline, "sdxl": load_tiny_sdxl_pipeline}[arch]()
    file = write_single_file(pipe, tmp_path / f"finetune-{arch}.safetensors")
    assert select_backbone(default_registry(), str(file))[0].name == name  # no model_index.json: tensor names
    b = Editor.from_pretrained(str(file), device="cpu", model_config=str(folder)).backbone
    assert b.name == name and b.model_id == str(file)
    for part in ("unet", "vae", "text_encoder", *(["text_encoder_2"] if arch == "sdxl" else [])):
        want, got = getattr(pipe, part).state_dict(), getattr(b.pipe, part).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(v, got[k]) for k, v in want.items()), part


def test_single_file_without_a_config_offline_says_what_is_missing(tmp_path):
    from gooddrag.testing import load_tiny_pipeline
    from gooddrag.testing.single_file import write_single_file

    file = write_single_file(load_tiny_pipeline(), tmp_path / "finetune.safetensors")
    with pytest.raises(ModelNotFoundError) as exc:
        Editor.from_pretrained(str(file), device="cpu")
    msg = str(exc.value)
    assert "\n" not in msg and "no configs" in msg and "--model-config" in msg and "finetune.safetensors" in msg


def test_sdxl_vae_stays_fp32_in_fp16_unless_it_can_take_it(tmp_path):
    """SDXL's VAE overflows in fp16 (its config says force_upcast): with fp16 weights it runs in
    fp32, the UNet and the text encoders in fp16; a VAE without force_upcast (what the fp16-fix VAE
    is) stays in fp16."""
    folder = tiny_sdxl_pipeline_dir()
    b = Editor.from_pretrained(str(folder), device="cpu", dtype="fp16").backbone
    assert (b.unet.dtype, b.vae.dtype, b.text_encoders[1].dtype) == (torch.float16, torch.float32, torch.float16)
    z = b.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert z.dtype == torch.float32 and b.decode(z).shape == (1, 3, 64, 64)
    fixed = tmp_path / "vae"
    shutil.copytree(folder / "vae", fixed)
    cfg = json.loads((fixed / "config.json").read_text())
    (fixed / "config.json").write_text(json.dumps({**cfg, "force_upcast": False}))
    b = Editor.from_pretrained(str(folder), device="cpu", dtype="fp16", vae=str(fixed)).backbone
    assert b.vae.dtype == torch.float16 and b.vae_id == str(fixed)
