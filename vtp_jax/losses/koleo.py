"""KoLeo (Kozachenko-Leonenko) nearest-neighbour regulariser on student CLS features, as DINOv2.

This file owns the KoLeo term of the SSL loss (spec section 2.3, [R] DINOv2
`dinov2/loss/koleo_loss.py`): it spreads the L2-normalised student CLS features of a batch apart by
penalising -log of each feature's distance to its nearest neighbour. Its weight (DINOv2: 0.1) is
applied by the caller.
"""

import jax
import jax.numpy as jnp


def koleo_loss(features: jax.Array, eps: float = 1e-8, pdist_eps: float = 1e-8,
               group_size: int | None = None) -> jax.Array:
  """-mean_i log(||x_i - x_nn(i) + pdist_eps||_2 + eps) over L2-normalised x, DINOv2 `KoLeoLoss`.

  Steps, each as DINOv2 writes them:
  - x = f / max(||f||, eps) (torch `F.normalize(eps=1e-8)`), in float32 (DINOv2 disables autocast);
  - nearest neighbour = argmax of x x^T with the diagonal set to -1, so a point never picks itself;
  - distance = torch `nn.PairwiseDistance(2, eps=1e-8)`, which adds eps to the DIFFERENCE before the
    norm (torch's default would be 1e-6; DINOv2 passes 1e-8), then -log(distance + eps), averaged.
  The neighbour index is piecewise constant, so gradients flow only through the distances.

  Args:
    features: (B, D) pre-head student CLS features of one global crop.
    eps: normalisation and log epsilon (DINOv2: 1e-8).
    pdist_eps: epsilon added to x_i - x_nn inside the distance (DINOv2: 1e-8).
    group_size: None searches neighbours over the whole (global) batch. DINOv2 runs KoLeo per GPU, so
      neighbours come only from the local batch (`batch_size_per_gpu`) and DDP averages the ranks;
      pass that size to reproduce it: the batch is cut into consecutive groups of `group_size` and the
      loss is the mean over all of them. The larger the search set, the closer the nearest neighbour
      and the larger the loss, so the choice changes the effective KoLeo weight.
  """
  if features.ndim != 2:
    raise ValueError(f'features must be (batch, dim); got shape {features.shape}. For the stacked '
                     'global crops (n_global, B, D) use koleo_loss_global_crops.')
  batch, dim = features.shape
  if group_size is None:
    group_size = batch
  if group_size < 2 or batch % group_size:
    raise ValueError(f'group_size={group_size} must be >= 2 and divide the batch ({batch}); a point '
                     'needs at least one neighbour in its group.')
  x = features.astype(jnp.float32)
  x = x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), eps)
  x = x.reshape(batch // group_size, group_size, dim)

  dots = jnp.einsum('gid,gjd->gij', x, x)
  dots = jnp.where(jnp.eye(group_size, dtype=bool), -1.0, dots)
  neighbour_index = jnp.argmax(dots, axis=-1)
  neighbours = jnp.take_along_axis(x, neighbour_index[..., None], axis=1)
  distances = jnp.sqrt(jnp.sum(jnp.square(x - neighbours + pdist_eps), axis=-1))
  return -jnp.mean(jnp.log(distances + eps))


def koleo_loss_global_crops(global_cls_features: jax.Array, eps: float = 1e-8,
                            pdist_eps: float = 1e-8, group_size: int | None = None) -> jax.Array:
  """Sum of `koleo_loss` over the global crops, as DINOv2: sum(koleo(p) for p in cls.chunk(2)).

  Each crop is regularised on its own because the two crops of one image are SUPPOSED to be close;
  pooling them would make every image its own neighbour. DINOv2 logs this sum / 2 (times the weight).

  Args:
    global_cls_features: (n_global, B, D) pre-head student CLS features, one slice per global crop.
  """
  if global_cls_features.ndim != 3:
    raise ValueError(f'global_cls_features must be (n_global, batch, dim); got shape '
                     f'{global_cls_features.shape}.')
  return sum(koleo_loss(global_cls_features[i], eps, pdist_eps, group_size)
             for i in range(global_cls_features.shape[0]))
