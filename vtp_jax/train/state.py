"""The train state (a pytree of arrays) and its sharded creation.

TrainState(step, params, opt_state, teacher, loss_state, rng, disc):
  params      {'encoder', 'decoder', 'text', 'dino_head', 'clip'}: the student (float32)
  opt_state   optax state; every leaf that mirrors a parameter takes that parameter's sharding;
              modules no enabled loss reads (the text tower of ae_baseline) have none (optim.py)
  teacher     EMA of {'encoder', 'dino_head'}, initialised as a copy of the student (DINOv2 does
              this; spec 1.9 leaves it open for VTP); same logical axes, so same shardings
  loss_state  {'dino_center': (1, K), 'ibot_center': (1, K)} under centering, {} under Sinkhorn
  rng         raw uint32 key data (checkpointable as a plain array); `fold_in(step)` per step
  disc        {} until the decoder GAN stage, then {'params', 'opt_state'}
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from vtp_jax import batch as batch_lib
from vtp_jax import sharding
from vtp_jax.models import vtp
from vtp_jax.train import optim

TEACHER_KEYS = ('encoder', 'dino_head')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: object
  teacher: dict
  loss_state: dict
  rng: jax.Array
  disc: dict


def abstract_key():
  """The shape and dtype of a PRNG key, made without running anything on any device: under
  `jax.set_mesh` with a compile-only device list (a TPU topology on a CPU host), `jax.random.key`
  would execute there and fail. Abstract state, batch and step are built from shapes alone."""
  return jax.eval_shape(jax.random.key, 0)


def teacher_of(params) -> dict:
  return {k: params[k] for k in TEACHER_KEYS}


def make_optimizer(config, params_shape):
  return optim.make_optimizer(
      config.optim, params_shape, scan_layers=config.precision.scan_layers,
      encoder_depth=config.model.encoder.depth, total_steps=config.train.steps,
      global_batch=config.data.batch_size,
      idle=optim.idle_modules(batch_lib.active_branches(config), params_shape))


def _init_inputs(config):
  size = config.model.patch_size * 2
  return (jnp.zeros((1, size, size, 3), jnp.float32),
          jnp.zeros((1, config.model.text.context_length), jnp.int32))


def _loss_state(config):
  if config.loss.teacher_norm == 'centering':
    k = config.model.dino_head.prototypes
    return {'dino_center': jnp.zeros((1, k), jnp.float32),
            'ibot_center': jnp.zeros((1, k), jnp.float32)}
  if config.loss.teacher_norm != 'sinkhorn':
    raise ValueError(f"loss.teacher_norm={config.loss.teacher_norm!r}; use 'centering' or "
                     "'sinkhorn'.")
  return {}


def opt_state_shardings(abstract_opt_state, param_shardings, mesh):
  """Leaves of the optimizer state that mirror a parameter (Adam moments) take its sharding;
  counters, schedules' scalars and anything else are replicated."""
  by_path = {tuple(k.key for k in path): s for path, s in
             jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

  def pick(path, leaf):
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and len(hit.spec) <= leaf.ndim:
        return hit
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def param_init(config, mesh):
  """(init_params(key) -> boxed params, their NamedShardings, their abstract unboxed shapes)."""
  model = vtp.build(config)
  rules = sharding.rules_from_config(config)
  images, tokens = _init_inputs(config)

  def init_params(key):
    return model.init({'params': key}, images, tokens)['params']

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_params, abstract_key())
    param_shardings = sharding.logical_to_sharding(boxed, mesh, rules)
    params_shape = sharding.unbox_without_constraint(boxed)
  return init_params, param_shardings, params_shape


def create(config, mesh, rng_seed: int | None = None, *, abstract: bool = False):
  """(state, state_shardings, optimizer): the train state initialised straight into its shards.

  With `abstract=True` the state's leaves are ShapeDtypeStructs carrying their shardings and
  nothing is initialised or allocated: the target a checkpoint restore fills in (a resumed run
  never materialises a throw-away random state), or the input `jit(...).lower` needs.
  The stage-1 state; `vtp_jax.tasks.for_config(config).create_state` picks each training's.
  """
  rules = sharding.rules_from_config(config)
  seed = config.seed if rng_seed is None else rng_seed
  init_params, param_shardings, params_shape = param_init(config, mesh)
  tx = make_optimizer(config, params_shape)

  def init_state(key):
    init_key, state_key = jax.random.split(key)
    params = nn.unbox(init_params(init_key))
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        teacher=teacher_of(params), loss_state=_loss_state(config),
        rng=jax.random.key_data(state_key), disc={})

  replicated = NamedSharding(mesh, P())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_state = jax.eval_shape(init_state, abstract_key())
    shardings = TrainState(
        step=replicated, params=param_shardings,
        opt_state=opt_state_shardings(abstract_state.opt_state, param_shardings, mesh),
        teacher=teacher_of(param_shardings),
        loss_state=jax.tree.map(lambda _: replicated, abstract_state.loss_state),
        rng=replicated, disc={})
  if abstract:
    return sharding.with_shardings(abstract_state, shardings), shardings, tx
  key = jax.random.key(seed)  # outside the mesh context: made on the default device, then jit's input
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(init_state, out_shardings=shardings)(key)
  return state, shardings, tx
