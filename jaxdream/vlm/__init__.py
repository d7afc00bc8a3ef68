"""Captioning, question answering and grounding with vision-language models: Kosmos-2, Qwen2.5-VL, Qwen3-VL.

    from jaxdream import vlm
    bundle = vlm.load('path/to/kosmos-2-patch14-224')  # a transformers-format folder; config.json's
                                                        # model_type: 'kosmos-2', 'qwen2_5_vl' or 'qwen3_vl'
    out = vlm.caption(bundle, ['dog.jpg'])              # or the folder itself; PIL images, uint8 arrays
    out[0]['text']      # 'An image of a dog on a sofa.'
    out[0]['entities']  # [('a dog', (12, 17), [(x1, y1, x2, y2)]), ...], boxes normalised to [0, 1]
    vlm.ask(bundle, ['dog.jpg'], 'What color is the dog?')[0]['text']  # the answer

Kosmos-2 matches transformers' Kosmos2Processor and `generate`: the prompt ids and image placeholder
mask, CLIP image preprocessing (PIL resize, crop, normalise), greedy and beam search token for token,
sampling with the same temperature/top-k/top-p filtering, and `post_process_generation`'s parsing. The Qwen
models answer with JSON boxes, which `parse_qwen_grounding` reads into the same entity format.

processor.py makes Kosmos-2's inputs, generation.py decodes (model-agnostic: any model implementing its
`GenerativeModel` protocol), grounding.py parses and draws boxes, qwen.py loads and runs the Qwen models,
api.py is the user-facing `load` / `caption` / `ask` / `check_subject` over all three.
"""

from jaxdream.io.images import list_images  # noqa: F401 (jaxdream.vlm.list_images before the io package)
from jaxdream.vlm.api import (  # noqa: F401
  MODEL_TYPES,
  QWEN_CAPTION_PROMPT,
  QWEN_LOCATE_PROMPT,
  Kosmos2Bundle,
  ask,
  caption,
  check_subject,
  load,
  model_type,
  phrase_heatmaps,
)
from jaxdream.vlm.generation import GenerativeModel, beam_search, generate, sample, warp_logits  # noqa: F401
from jaxdream.vlm.grounding import (  # noqa: F401
  draw_entities,
  draw_heatmap,
  parse_grounding,
  parse_qwen_grounding,
  patch_box,
  subject_boxes,
)
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
