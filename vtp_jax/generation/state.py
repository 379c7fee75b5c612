"""The generator's train state and its sharded creation, with train/state.py's interface:
`create(config, mesh, rng_seed=None, abstract=False) -> (state, shardings, tx)`.

GenState(step, params, ema, opt_state, rng):
  params     the LightningDiT's weights (float32), sharded by their logical axes (sharding.py)
  ema        the exponential moving average of params (LightningDiT: decay 0.9999 every step,
             started as a copy), the weights samples are drawn with; same shardings as params
  opt_state  AdamW (optax); leaves mirroring a parameter take its sharding
  rng        raw uint32 key data; `fold_in(step)` per step
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from vtp_jax import sharding
from vtp_jax.generation import dit
from vtp_jax.train import schedules
from vtp_jax.train import state as tokenizer_state


@flax.struct.dataclass
class GenState:
  step: jax.Array
  params: dict
  ema: dict
  opt_state: object
  rng: jax.Array


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW at config.optim's lr schedule, betas, eps and weight decay; optional norm clipping.
  LightningDiT: lr 2e-4 constant, betas (0.9, 0.95), no weight decay, no clipping (spec 4.1)."""
  o = config.optim
  lr = schedules.lr_schedule(o, int(config.train.steps), int(config.data.batch_size))
  parts = []
  if float(o.clip_grad_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(o.clip_grad_norm)))
  parts.append(optax.adamw(lr, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                           weight_decay=float(o.weight_decay)))
  return optax.chain(*parts)


def param_init(config, mesh):
  """(init_params(key) -> boxed params, their NamedShardings, abstract unboxed shapes)."""
  model = dit.build(config)
  rules = sharding.rules_from_config(config)
  inputs = dit.init_inputs(config)

  def init_params(key):
    return model.init({'params': key}, *inputs)['params']

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_params, tokenizer_state.abstract_key())
    param_shardings = sharding.logical_to_sharding(boxed, mesh, rules)
  return init_params, param_shardings, sharding.unbox_without_constraint(boxed)


def create(config, mesh, rng_seed: int | None = None, *, abstract: bool = False):
  """(state, state_shardings, optimizer), initialised straight into its shards; with
  `abstract=True` ShapeDtypeStructs carrying their shardings, nothing run on any device."""
  rules = sharding.rules_from_config(config)
  seed = config.seed if rng_seed is None else rng_seed
  init_params, param_shardings, _ = param_init(config, mesh)
  tx = make_optimizer(config)

  def init_state(key):
    init_key, state_key = jax.random.split(key)
    params = nn.unbox(init_params(init_key))
    return GenState(step=jnp.zeros((), jnp.int32), params=params,
                    ema=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    rng=jax.random.key_data(state_key))

  replicated = sharding.replicated(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_state = jax.eval_shape(init_state, tokenizer_state.abstract_key())
    shardings = GenState(
        step=replicated, params=param_shardings, ema=param_shardings,
        opt_state=tokenizer_state.opt_state_shardings(abstract_state.opt_state, param_shardings,
                                                      mesh),
        rng=replicated)
  if abstract:
    return sharding.with_shardings(abstract_state, shardings), shardings, tx
  key = jax.random.key(seed)  # outside the mesh context, as train/state.py does
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(init_state, out_shardings=shardings)(key)
  return state, shardings, tx
