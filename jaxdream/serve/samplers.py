"""A1111's sampler and schedule-type names <-> jaxdream's schedulers.

A1111 < 1.9 names a sampler with its schedule ("DPM++ 2M Karras"); >= 1.9 sends the sampler ("DPM++ 2M") and a
`scheduler` ("Karras", "Automatic"). Both are read; names match case-insensitively, with A1111's k-diffusion
aliases (k_euler_a, ...).
"""

from __future__ import annotations

from jaxdream.io.images import SAMPLER_NAMES

DEFAULT_SAMPLER = 'Euler'  # A1111's API default (sampler_index)
# Our name -> A1111's aliases for it.
_ALIASES = {
  'ddpm': (),
  'ddim': ('ddim',),
  'pndm': ('plms',),
  'lms': ('k_lms',),
  'euler': ('k_euler',),
  'euler_a': ('k_euler_a', 'k_euler_ancestral'),
  'heun': ('k_heun',),
  'euler_karras': (),
  'lms_karras': ('k_lms_ka',),
  'heun_karras': (),
  'unipc': (),
  'unipc_karras': (),
  'dpmpp_2m': ('k_dpmpp_2m',),
  'dpmpp_2m_karras': ('k_dpmpp_2m_ka',),
  'dpmpp_2m_sde': ('k_dpmpp_2m_sde',),
  'dpmpp_2m_sde_karras': ('k_dpmpp_2m_sde_ka',),
}
# A1111 schedule types we have: 'automatic' is each sampler's own, and A1111's 'uniform' is the same (the
# model's own timesteps, evenly spaced); 'normal' and 'simple', its other evenly spaced schedules (the default of
# some clients), run as it too: they differ from it only in where the evenly spaced steps start and end.
# 'karras' exists for Euler, LMS, Heun, DPM++ 2M and DPM++ 2M SDE.
SCHEDULERS = (
  {'name': 'automatic', 'label': 'Automatic', 'aliases': None, 'default_rho': -1, 'need_inner_model': False},
  {'name': 'uniform', 'label': 'Uniform', 'aliases': None, 'default_rho': -1, 'need_inner_model': True},
  {'name': 'normal', 'label': 'Normal', 'aliases': None, 'default_rho': -1, 'need_inner_model': True},
  {'name': 'simple', 'label': 'Simple', 'aliases': None, 'default_rho': -1, 'need_inner_model': True},
  {'name': 'karras', 'label': 'Karras', 'aliases': None, 'default_rho': 7.0, 'need_inner_model': False},
)
_EVENLY_SPACED = ('automatic', '', 'uniform', 'normal', 'simple')
_KARRAS = {
  **{name: f'{name}_karras' for name in ('euler', 'lms', 'heun', 'unipc')},
  **{f'{name}_karras': f'{name}_karras' for name in ('euler', 'lms', 'heun', 'unipc')},
  'dpmpp_2m': 'dpmpp_2m_karras',
  'dpmpp_2m_karras': 'dpmpp_2m_karras',
  'dpmpp_2m_sde': 'dpmpp_2m_sde_karras',
  'dpmpp_2m_sde_karras': 'dpmpp_2m_sde_karras',
}


class UnknownSampler(ValueError):
  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


def _lookup() -> dict[str, str]:
  names = {}
  for ours, a1111 in SAMPLER_NAMES.items():
    for name in (a1111, ours, *_ALIASES[ours]):
      names[name.lower()] = ours
  return names


_BY_NAME = _lookup()


def samplers() -> list[dict]:
  """GET /sdapi/v1/samplers: A1111's {name, aliases, options} per sampler."""
  return [
    {'name': a1111, 'aliases': list(_ALIASES[ours]), 'options': {'scheduler': 'karras'} if 'karras' in ours else {}}
    for ours, a1111 in SAMPLER_NAMES.items()
  ]


def resolve(sampler_name: str | None, scheduler: str | None = None) -> str:
  """Our scheduler name for an A1111 sampler name and schedule type; UnknownSampler (a 422) lists the valid ones."""
  name = (sampler_name or DEFAULT_SAMPLER).strip()
  ours = _BY_NAME.get(name.lower())
  if ours is None:
    raise UnknownSampler(
      'sampler_name', f'unknown sampler_name {name!r}; valid names: {", ".join(SAMPLER_NAMES.values())}'
    )
  schedule = (scheduler or 'automatic').strip().lower()
  if schedule in _EVENLY_SPACED:
    return ours
  if schedule == 'karras' and ours in _KARRAS:
    return _KARRAS[ours]
  valid = ', '.join(s['label'] for s in SCHEDULERS)
  raise UnknownSampler(
    'scheduler',
    f'scheduler {scheduler!r} with sampler {name!r} is not supported; valid: {valid} (Karras with Euler, LMS, Heun, '
    'UniPC, DPM++ 2M and DPM++ 2M SDE only; '
    'the others with any sampler)',
  )


def a1111_name(ours: str) -> str:
  return SAMPLER_NAMES[ours]
