"""A fork of the encoder's features into the projection and the frame-order branches whose backward pass
balances the two tasks' gradients before they enter the shared encoder (`ssl.gradient_balance`).

Forward it is the identity, twice; only the cotangents are changed, so loss values and both heads' own
gradients are exactly the unbalanced ones. The norms are over the whole (global) batch: under jit with a
sharded batch the reduction is global, so sharded equals single-device.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

GRADIENT_BALANCES = ('none', 'equal_norm')


def _norm(g: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))


def _rescale(norm: jax.Array, target: jax.Array) -> jax.Array:
  """target / norm, and 0 for a zero gradient (a silent task, e.g. NT-Xent under the order-first
  curriculum): target / tiny would overflow to inf, and inf × 0 is NaN."""
  return jnp.where(norm > 0, target / jnp.where(norm > 0, norm, 1.0), 0.0)


def balance_cotangents(g_projection: jax.Array, g_order: jax.Array, kind: str) -> jax.Array:
  """The encoder-side cotangent from the two branches' cotangents (same shape).

  'none': their sum. 'equal_norm': each rescaled to the mean of the two norms, then summed — neither task's
  gradient can drown the other's (NT-Xent's scales with 1/τ). (PCGrad-style surgery was left out: on the
  demo's features the two gradients are orthogonal, cosine ≈ 0.005, so it would be the plain sum.)
  """
  if kind == 'none':
    return g_projection + g_order
  gp, go = g_projection.astype(jnp.float32), g_order.astype(jnp.float32)
  if kind == 'equal_norm':
    n_p, n_o = _norm(gp), _norm(go)
    target = 0.5 * (n_p + n_o)
    out = gp * _rescale(n_p, target) + go * _rescale(n_o, target)
  else:
    raise ValueError(f'gradient_balance must be one of {GRADIENT_BALANCES}, got {kind!r}')
  return out.astype(g_projection.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fork(features: jax.Array, kind: str):
  """(features, features): the projection branch's copy and the frame-order branch's copy."""
  return features, features


def _fork_fwd(features, kind):
  return (features, features), None


def _fork_bwd(kind, _, cotangents):
  g_projection, g_order = cotangents
  return (balance_cotangents(g_projection, g_order, kind),)


fork.defvjp(_fork_fwd, _fork_bwd)
