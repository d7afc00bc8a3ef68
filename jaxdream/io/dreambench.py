"""The DreamBench layout (the DreamBooth paper's dataset): `DATASET/<subject>/*.jpg` and
`DATASET/prompts_and_classes.txt`, which lists subject,class rows and two 25-prompt lists (object and live
subject) written as `'a {0} {1} in the jungle'.format(unique_token, class_token)`."""

from __future__ import annotations

import ast
import dataclasses
import os
import re

PROMPTS_FILE = 'prompts_and_classes.txt'
LIVE_CLASSES = ('dog', 'cat')  # subjects of these classes get the live-subject prompts, the others the object ones
_PROMPT = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")


class DreamBenchError(ValueError):
  """A folder that is not in the DreamBench layout; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class DreamBench:
  folder: str
  classes: dict[str, str]  # subject -> class, in the file's order
  object_prompts: tuple[str, ...]  # templates with {0} (identifier) and {1} (class)
  live_prompts: tuple[str, ...]

  def prompts(self, subject: str) -> tuple[str, ...]:
    """The subject's prompt templates: the live-subject list for dogs and cats, the object list otherwise."""
    return self.live_prompts if self.classes[subject] in LIVE_CLASSES else self.object_prompts


def read_dreambench(folder: str) -> DreamBench:
  path = os.path.join(folder, PROMPTS_FILE)
  if not os.path.isfile(path):
    raise DreamBenchError(f'{folder}: no {PROMPTS_FILE}; expected the DreamBench layout (DATASET/<subject>/*.jpg)')
  classes, lists, section = {}, {'object': [], 'live': []}, None
  with open(path, encoding='utf-8-sig') as f:  # -sig: an editor's byte-order mark is not part of the first name
    for number, line in enumerate(f, 1):
      text = line.strip()
      low = text.lower()
      if low == 'object prompts':
        section = 'object'
      elif low == 'live subject prompts':
        section = 'live'
      elif section is None and ',' in text and low != 'subject_name,class':
        subject, cls = (s.strip() for s in text.split(',', 1))
        classes[subject] = cls
      elif section and (m := _PROMPT.match(text)):
        try:  # a Python string literal, as the paper's file is Python: escapes mean what they mean there
          template = ast.literal_eval(m.group(1) + m.group(2) + m.group(1))
        except (SyntaxError, ValueError) as e:
          raise DreamBenchError(
            f'{path}:{number}: not a Python string literal ({e.msg if isinstance(e, SyntaxError) else e})'
          ) from None
        try:  # the templates are filled with .format(identifier, class): no other field
          template.format('', '')
        except (IndexError, KeyError, ValueError) as e:
          raise DreamBenchError(
            f'{path}:{number}: {template!r} is not a prompt template with fields {{0}} (identifier) and {{1}} '
            f'(class) only ({type(e).__name__}: {e})'
          ) from None
        lists[section].append(template)
  missing = [s for s in classes if not os.path.isdir(os.path.join(folder, s))]
  if not classes or not lists['object'] or not lists['live'] or missing:
    raise DreamBenchError(
      f'{path}: read {len(classes)} subject(s), {len(lists["object"])} object and {len(lists["live"])} '
      f'live-subject prompt(s)' + (f'; no folder for {missing}' if missing else '')
    )
  return DreamBench(folder, classes, tuple(lists['object']), tuple(lists['live']))
