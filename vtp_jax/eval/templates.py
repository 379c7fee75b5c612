"""Zero-shot prompt templates: the 80 OpenAI ImageNet templates VTP evaluates with (spec 4.1), a
short set for the synthetic `vtp_shapes` classes, and the choice of set for a dataset.

The 80 templates are data copied verbatim, in order, from OpenCLIP's
`src/open_clip/zero_shot_metadata.py` (`OPENAI_IMAGENET_TEMPLATES`, itself from OpenAI CLIP's
`Prompt_Engineering_for_ImageNet.ipynb`), written as `str.format` patterns with one `{}`.
"""

OPENAI_IMAGENET_TEMPLATES = (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
)

# OpenAI's 7-template subset (same notebook; OpenCLIP `SIMPLE_IMAGENET_TEMPLATES`).
SIMPLE_IMAGENET_TEMPLATES = (
    'itap of a {}.',
    'a bad photo of the {}.',
    'a origami {}.',
    'a photo of the large {}.',
    'a {} in a video game.',
    'art of the {}.',
    'a photo of the small {}.',
)

# vtp_shapes class names read 'red circle'. Ours, not from any paper: the wordings of the dataset's
# own single-object captions (vtp_jax/data/shapes.py, no full stop), because a tiny text tower that
# has only read those captions should not be asked to generalise to 80 photographic phrasings.
SHAPES_TEMPLATES = (
    'a {}',
    'a photo of a {}',
    'a picture of a {}',
    'a large {}',
    'an image showing a single {}',
)

TEMPLATE_SETS = {
    'openai': OPENAI_IMAGENET_TEMPLATES,
    'simple': SIMPLE_IMAGENET_TEMPLATES,
    'shapes': SHAPES_TEMPLATES,
    'name': ('{}',),  # the bare class name
}


def templates_for(choice: str, dataset_spec: str) -> tuple[str, ...]:
  """The template set named by `choice` ('auto' picks 'shapes' for vtp_shapes, else 'openai')."""
  if choice == 'auto':
    choice = 'shapes' if dataset_spec.split(':')[0] == 'shapes' else 'openai'
  if choice not in TEMPLATE_SETS:
    raise ValueError(f'templates={choice!r} is not one of {("auto",) + tuple(TEMPLATE_SETS)}; '
                     'set --config.evals.templates to one of them.')
  return TEMPLATE_SETS[choice]
