"""Training-time settings of a model's modules: rematerialisation (activation checkpointing) and the
attention kernel.

training.step sets them on the step's own copy of the models (`set_training_mode`), so sampling with the
same pipeline is untouched. `remat` (train.remat) is one of:
  'none'       keep every activation the backward pass needs (fastest, most memory);
  'attention'  each attention call keeps only q, k and v: its scores are recomputed in the backward pass
               (what flash attention's own backward does; with 'flash' this changes little);
  'blocks'     each transformer block, ResNet block and text-encoder layer keeps its inputs and the outputs
               of its weight products (convolutions, projections); norms, activations and attention are
               recomputed;
  'full'       each of those blocks keeps only its inputs: everything inside is recomputed (least memory,
               about one more forward pass of compute).
Remat recomputes the same operations: gradients equal those without it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdream.nn.layers import WEIGHT_PRODUCT

REMAT = ('none', 'attention', 'blocks', 'full')


# Block-level policies: what a checkpointed block keeps besides its inputs. 'blocks' keeps values by name,
# not by primitive: a policy saving every matmul would also keep the flash kernel's per-tile score
# products (stacked over its loops: the whole score matrix).
_POLICIES = {
  'blocks': jax.checkpoint_policies.save_only_these_names(WEIGHT_PRODUCT),
  'full': jax.checkpoint_policies.nothing_saveable,
}


def check_remat(name: str) -> str:
  if name not in REMAT:
    raise ValueError(f'unknown remat policy {name!r}; choose one of {REMAT}')
  return name


def checkpoint(f, policy=None):
  """`jax.checkpoint(f, policy=policy)` whose backward recomputation cannot start before the gradient of
  f's output exists.

  jax.checkpoint's recomputation depends only on what the forward pass kept, so a scheduler may run it
  right after the forward pass, and then every block's recomputed activations are alive together, as
  without remat. XLA:CPU's does: it removes optimization barriers before scheduling, and its temporaries
  were the same for 'none', 'blocks' and 'full' (docs/performance.md). Here what the forward pass kept is
  made to depend on the incoming gradient (an exact zero computed from it is added), so that each block is
  recomputed only when the backward pass reaches it, on every backend."""
  checkpointed = jax.checkpoint(f, policy=policy)

  @jax.custom_vjp
  def run(*args):
    return checkpointed(*args)

  def forward(*args):
    return jax.vjp(checkpointed, *args)  # the VJP function's leaves are what the policy keeps

  def backward(vjp, grad):
    return _after(grad, vjp)(grad)

  run.defvjp(forward, backward)
  return run


def _after(grad, tree):
  """`tree` with its floating-point arrays plus an exact zero computed from `grad` (finite or not): equal
  values that a compiler can only compute once `grad` exists."""
  zero = jnp.nan_to_num(jnp.ravel(jax.tree.leaves(grad)[0])[0]) * 0
  floating = lambda x: isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
  return jax.tree.map(lambda x: x + zero.astype(x.dtype) if floating(x) else x, tree)


def remat_block(module, method, *args):
  """`method(module, *args)`, checkpointed under the module's `remat` policy when it is a block-level one
  ('blocks', 'full'); modules carry `remat = 'none'` until set_training_mode sets it. The block must not
  change its own state (none of the checkpointed blocks does): it runs on a copy."""
  policy = _POLICIES.get(module.remat)
  if policy is None:
    return method(module, *args)
  graphdef, state = nnx.split(module)
  return checkpoint(lambda state, *args: method(nnx.merge(graphdef, state), *args), policy)(state, *args)


def remat_attention(remat: str, attend):
  """The attention call `attend`, checkpointed (only its inputs kept) under remat='attention'."""
  return checkpoint(attend) if remat == 'attention' else attend


def set_training_mode(model: nnx.Module, *, remat: str = 'none', attention: str | None = None) -> nnx.Module:
  """Set every submodule's remat policy and (when given) attention implementation, in place."""
  check_remat(remat)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      if hasattr(node, 'remat'):
        node.remat = remat
      if attention is not None and hasattr(node, 'attention_impl'):
        node.attention_impl = attention
  return model
