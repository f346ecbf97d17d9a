"""LoadSubjectImages: a folder of photos (or an IMAGE batch) + instance prompt → SUBJECT."""

from __future__ import annotations

from comfy_api.latest import io

from ..lora2_engine.data import instance_prompt
from . import bridge, core
from .types import CATEGORY, SUBJECT, show


class LoadSubjectImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRA2_LoadSubjectImages", display_name="Load Subject Images (LoRA²)",
            category=CATEGORY,
            description="Photos of one subject with their captions. A name.txt beside "
                        "name.jpg (kohya style) overrides the instance prompt for that image; "
                        "unreadable files are skipped and named.",
            inputs=[
                io.String.Input("folder", default="subject",
                                tooltip="folder of photos inside ComfyUI/input, e.g. 'subject' "
                                        "(other folders only if the server's owner set "
                                        "LORA2_ALLOW_ANY_FOLDER=1)"),
                io.String.Input("instance_token", default="sks",
                                tooltip="rare word that will mean your subject"),
                io.String.Input("class_noun", default="dog", tooltip="what the subject is"),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8,
                             tooltip="training size in pixels (the short side in bucket "
                                     "mode): 1024 for SDXL, 512 for SD1.5; the CPU demo uses "
                                     "64"),
                io.Combo.Input("mode", options=["crop", "bucket"], default="crop",
                               tooltip="crop: center square; bucket: keep the aspect ratio"),
                io.Image.Input("images", optional=True,
                               tooltip="use these images instead of the folder"),
            ],
            outputs=[SUBJECT.Output(display_name="subject",
                                    tooltip="photos + captions for Train Adaptive LoRA"),
                     io.Image.Output(display_name="images",
                                     tooltip="the photos as they will be trained on"),
                     io.String.Output(display_name="captions",
                                      tooltip="one caption per photo")])

    @classmethod
    def execute(cls, folder, instance_token, class_noun, resolution, mode,
                images=None) -> io.NodeOutput:
        prompt = instance_prompt(instance_token, class_noun)
        if images is not None:
            subject = core.subject_from_images(images, prompt, resolution, mode)
        else:
            subject = core.subject_from_folder(bridge.input_folder(folder), prompt, resolution,
                                               mode, within=bridge.input_root())
        batch = core.to_image_batch(subject.pixels)
        captions = "\n".join(subject.captions)
        return io.NodeOutput(subject, batch, captions, ui=show(cls, subject.summary(), batch))
