"""`jaxdream subjects`: a DreamBench-layout folder becomes a concepts file the per-subject LoRA trainer accepts."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from jaxdream.cli.main import main
from jaxdream.io.dreambench import read_dreambench
from jaxdream.training import config as config_lib

SHARED = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'dreambench')
PROMPTS = """Classes

subject_name,class
backpack,backpack
dog,dog
bear_plushie,stuffed animal
my teddy,stuffed animal

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the snow'.format(unique_token, class_token),
"a {0} {1} wearing a red hat".format(unique_token, class_token),
'a {0} {1} in a chef outfit'.format(unique_token, class_token)
]
"""


@pytest.fixture
def bench(tmp_path):
  folder = tmp_path / 'bench'
  rng = np.random.default_rng(0)
  for subject in ('backpack', 'dog', 'bear_plushie', 'my teddy'):  # a folder name the trainer would refuse
    (folder / subject).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(folder / subject / f'{i:02d}.jpg')
  (folder / 'prompts_and_classes.txt').write_text(PROMPTS)
  return folder


def test_subjects_file_has_one_concept_per_subject_and_one_class_folder_per_class(bench, tmp_path, capsys):
  out = tmp_path / 'subjects.json'
  assert main(['subjects', '--dreambench', str(bench), '--out', str(out), '--num-class-images', '7']) == 0
  assert '4 subjects, 3 classes' in capsys.readouterr().out
  concepts = json.loads(out.read_text())
  assert [c['name'] for c in concepts] == ['backpack', 'dog', 'bear_plushie', 'my_teddy']  # as the trainer names it
  by_name = {c['name']: c for c in concepts}
  assert by_name['bear_plushie']['instance_prompt'] == 'a photo of sks stuffed animal'
  assert by_name['bear_plushie']['class_prompt'] == 'a photo of stuffed animal'
  assert by_name['bear_plushie']['class_dir'] == by_name['my_teddy']['class_dir'] != by_name['dog']['class_dir']
  assert by_name['dog']['instance_dir'] == os.path.abspath(bench / 'dog') and by_name['dog']['num_class_images'] == 7

  c = config_lib.config_file(os.path.join(os.path.dirname(__file__), '..', 'configs', 'lora_many_subjects.py'))
  c.data.concepts_file = str(out)
  checked = config_lib.validate(c)  # what the trainer does before anything else
  assert [x['name'] for x in checked] == [x['name'] for x in concepts]


def test_prompt_lists_follow_the_protocol_live_for_dogs_and_cats(bench):
  b = read_dreambench(str(bench))
  assert b.object_prompts == ('a {0} {1} in the jungle', 'a red {0} {1}')
  assert b.prompts('dog') == b.live_prompts and len(b.live_prompts) == 3
  assert b.prompts('bear_plushie') == b.object_prompts
  assert b.live_prompts[1].format('sks', 'dog') == 'a sks dog wearing a red hat'


def test_prompts_are_read_as_the_python_literals_they_are_and_a_byte_order_mark_is_no_name(bench):
  text = (bench / 'prompts_and_classes.txt').read_text()
  text = text.replace("'a red {0} {1}'", "'a {0} {1} in a child\\'s room'")  # an escaped quote, as Python writes it
  assert "child\\'s" in text
  (bench / 'prompts_and_classes.txt').write_bytes(b'\xef\xbb\xbf' + text.encode())  # saved with a BOM
  b = read_dreambench(str(bench))
  assert b.object_prompts[1].format('sks', 'bag') == "a sks bag in a child's room"
  assert list(b.classes)[0] == 'backpack'
  (bench / 'prompts_and_classes.txt').write_text(text.replace("'a {0} {1} in the jungle'", "'a {0} \\N{nope} {1}'"))
  with pytest.raises(ValueError, match=r'prompts_and_classes.txt:\d+: not a Python string literal'):
    read_dreambench(str(bench))
  for field in ('{place}', '{2}', '{'):  # filled with .format(identifier, class) when scored: fail when read
    (bench / 'prompts_and_classes.txt').write_text(
      text.replace("'a {0} {1} in the jungle'", f"'a {{0}} {{1}} in {field}'")
    )
    with pytest.raises(ValueError, match=r'prompts_and_classes.txt:\d+: .* fields \{0\} \(identifier\)'):
      read_dreambench(str(bench))


@pytest.mark.skipif(not os.path.isdir(SHARED), reason='the shared DreamBench copy is not next to this checkout')
def test_the_shared_dreambench_has_30_subjects_9_of_them_live_and_25_prompts_each():
  b = read_dreambench(SHARED)
  assert len(b.classes) == 30 and len(b.object_prompts) == len(b.live_prompts) == 25
  assert sum(b.prompts(s) == b.live_prompts for s in b.classes) == 9


def test_a_folder_without_the_layout_is_an_error_naming_what_is_missing(bench, tmp_path, capsys):
  assert main(['subjects', '--dreambench', str(tmp_path), '--out', str(tmp_path / 'x.json')]) == 2
  assert 'no prompts_and_classes.txt' in capsys.readouterr().err
  argv = ['subjects', '--dreambench', str(bench), '--out']
  assert main([*argv, str(tmp_path)]) == 2  # a folder where the file goes
  assert 'exists and is a folder' in capsys.readouterr().err
  assert main([*argv, str(tmp_path / 'x.json'), '--identifier', '']) == 2
  assert "--identifier '': one word" in capsys.readouterr().err
  shutil.rmtree(bench / 'my teddy')
  assert main([*argv, str(tmp_path / 'x.json')]) == 2
  assert "no folder for ['my teddy']" in capsys.readouterr().err
  assert not (tmp_path / 'x.json').exists()
