"""Image captioning and grounding with vision-language models (Kosmos-2 today).

    from jaxdream import vlm
    bundle = vlm.load('path/to/kosmos-2-patch14-224')  # a transformers-format folder
    out = vlm.caption(bundle, ['dog.jpg'])              # or the folder itself; PIL images, uint8 arrays
    out[0]['text']      # 'An image of a dog on a sofa.'
    out[0]['entities']  # [('a dog', (12, 17), [(x1, y1, x2, y2)]), ...], boxes normalised to [0, 1]

Everything matches transformers' Kosmos2Processor and `generate`: the prompt ids and image placeholder
mask, CLIP image preprocessing (PIL resize, crop, normalise), greedy and beam search token for token,
sampling with the same temperature/top-k/top-p filtering, and `post_process_generation`'s parsing.

processor.py makes the inputs, generation.py decodes (model-agnostic: any model implementing its
`GenerativeModel` protocol), grounding.py parses and draws boxes, api.py is the user-facing `load` /
`caption` / `check_subject`.
"""

from jaxdream.io.images import list_images  # noqa: F401 (jaxdream.vlm.list_images before the io package)
from jaxdream.vlm.api import Kosmos2Bundle, caption, check_subject, load, phrase_heatmaps
from jaxdream.vlm.generation import GenerativeModel, beam_search, generate, sample, warp_logits  # noqa: F401
from jaxdream.vlm.grounding import draw_entities, draw_heatmap, parse_grounding, patch_box, subject_boxes  # noqa: F401
from jaxdream.vlm.processor import (  # noqa: F401
  DEFAULT_PROMPT,
  NUM_PATCH_INDEX_TOKENS,
  TAG_TOKENS,
  Kosmos2Processor,
  center_crop,
  load_image,
  preprocess_image,
  read_image_processor_config,
)
