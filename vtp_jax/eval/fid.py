"""FID: the FID InceptionV3 (pool3, 2048-d) in Flax Linen, activation statistics in float64, and the
Fréchet distance.

The network is pytorch-fid's `InceptionV3([3])` (`fid_inception_v3`), itself a port of the TF FID
graph `pt_inception-2015-12-05`: torchvision's Inception v3 with the FID-specific blocks below.
Input uint8 RGB (any size) -> /255 -> bilinear resize to 299x299 (align_corners=False, no
antialias, as F.interpolate) -> 2x-1 -> network -> global average pool -> (N, 2048). The TF graph
resizes differently, so numbers match pytorch-fid (what VTP reports, spec 4.1) rather than TF FID.

Layer layout (BasicConv = conv without bias + BatchNorm(eps 1e-3, inference) + ReLU; convs are
'VALID' unless a padding is named; module names are the torch state-dict names):
  Conv2d_1a_3x3 32 s2 | Conv2d_2a_3x3 32 | Conv2d_2b_3x3 64 p1 | maxpool 3 s2
  Conv2d_3b_1x1 80 | Conv2d_4a_3x3 192 | maxpool 3 s2
  Mixed_5b/5c/5d  FIDInceptionA(pool_features 32/64/64): 1x1 64 | 1x1 48 -> 5x5 64 p2 |
                  1x1 64 -> 3x3 96 p1 -> 3x3 96 p1 | avgpool 3 s1 p1 (count_include_pad=False) -> 1x1
  Mixed_6a        InceptionB: 3x3 384 s2 | 1x1 64 -> 3x3 96 p1 -> 3x3 96 s2 | maxpool 3 s2
  Mixed_6b..6e    FIDInceptionC(c7 128/160/160/192): 1x1 192 | 1x1 c7 -> 1x7 -> 7x1 192 |
                  1x1 c7 -> 7x1 -> 1x7 -> 7x1 -> 1x7 192 | avgpool (no pad count) -> 1x1 192
  Mixed_7a        InceptionD: 1x1 192 -> 3x3 320 s2 | 1x1 192 -> 1x7 -> 7x1 -> 3x3 192 s2 | maxpool
  Mixed_7b        FIDInceptionE_1: 1x1 320 | 1x1 384 -> (1x3 384, 3x1 384) |
                  1x1 448 -> 3x3 384 p1 -> (1x3, 3x1) | avgpool (no pad count) -> 1x1 192
  Mixed_7c        FIDInceptionE_2: as E_1 but the pool branch is maxpool 3 s1 p1
  global average pool -> 2048
Weights are user-supplied and read by eval/fid_weights.py (docs/evaluation.md); random
initialisation (`init_params`) serves only to test the plumbing.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # torchvision BasicConv2d


class BasicConv(nn.Module):
  features: int
  kernel: tuple = (1, 1)
  strides: tuple = (1, 1)
  padding: tuple = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, self.strides, padding=((ph, ph), (pw, pw)),
                use_bias=False, kernel_init=nn.initializers.he_normal(), name='conv')(x)
    c = self.features
    # BatchNorm with stored statistics as plain parameters (inference only, no batch_stats).
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    mean = self.param('mean', nn.initializers.zeros, (c,))
    var = self.param('var', nn.initializers.ones, (c,))
    x = (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias
    return nn.relu(x)


def _avg_pool(x):
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name='branch1x1')(x)
    b5 = BasicConv(48, name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, name='branch_pool')(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), (2, 2), name='branch3x3')(x)
    bd = BasicConv(64, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), (2, 2), name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, name='branch1x1')(x)
    b7 = BasicConv(c7, name='branch7x7_1')(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c7, name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, name='branch_pool')(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), (2, 2), name='branch3x3_2')(b3)
    b7 = BasicConv(192, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), (2, 2), name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  max_pool_branch: bool  # False: FIDInceptionE_1 (avg pool), True: FIDInceptionE_2 (max pool)

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, name='branch1x1')(x)
    b3 = BasicConv(384, name='branch3x3_1')(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], -1)
    bd = BasicConv(448, name='branch3x3dbl_1')(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], -1)
    pooled = _max_pool(x, stride=1, pad=1) if self.max_pool_branch else _avg_pool(x)
    bp = BasicConv(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """uint8 NHWC images -> (N, 2048) pool3 features (see the module docstring)."""
  resize_to: int = INPUT_SIZE  # tests shrink it (>= 75); real FID uses 299

  @nn.compact
  def __call__(self, images_uint8):
    x = images_uint8.astype(jnp.float32) / 255.0
    n, _, _, c = x.shape
    x = jax.image.resize(x, (n, self.resize_to, self.resize_to, c), 'bilinear', antialias=False)
    x = 2.0 * x - 1.0
    x = BasicConv(32, (3, 3), (2, 2), name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool(x)
    x = BasicConv(80, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(False, name='Mixed_7b')(x)
    x = InceptionE(True, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))


def _abstract_params() -> dict:
  model = FIDInceptionV3(75)  # parameter shapes do not depend on the input size
  dummy = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.uint8)
  return jax.eval_shape(model.init, jax.random.key(0), dummy)['params']


def param_shapes() -> dict:
  """{'/'-joined name: shape} of every parameter, without allocating them."""
  flat = jax.tree_util.tree_flatten_with_path(_abstract_params())[0]
  return {'/'.join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def init_params(seed: int = 0) -> dict:
  """Random parameters (He-normal convs, identity BatchNorm), drawn in NumPy without compiling the
  network: for plumbing tests only."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name in ('scale', 'var') else 0.0, np.float32)
  return jax.tree_util.tree_map_with_path(fill, _abstract_params())


@functools.lru_cache(maxsize=2)
def _apply_fn(resize_to: int):
  model = FIDInceptionV3(resize_to)
  return jax.jit(lambda params, images: model.apply({'params': params}, images))


def activations(params: dict, images_uint8, resize_to: int = INPUT_SIZE) -> np.ndarray:
  """(N, 2048) float32 pool3 activations of uint8 NHWC images."""
  images = np.asarray(images_uint8)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'FID takes uint8 NHWC RGB images; got {images.dtype} {images.shape}.')
  return np.asarray(_apply_fn(resize_to)(params, images))


class RunningStats:
  """Mean and covariance of activations accumulated batch by batch in float64 (np.cov, ddof=1)."""

  def __init__(self, dim: int = FEATURE_DIM):
    self.n = 0
    self.total = np.zeros((dim,), np.float64)
    self.outer = np.zeros((dim, dim), np.float64)

  def update(self, acts) -> None:
    acts = np.asarray(acts, np.float64)
    self.n += acts.shape[0]
    self.total += acts.sum(axis=0)
    self.outer += acts.T @ acts

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    if self.n < 2:
      raise ValueError(f'FID statistics need at least 2 images; got {self.n}.')
    mu = self.total / self.n
    cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return mu, cov


def _psd_factor(matrix: np.ndarray) -> np.ndarray:
  """F (D, r) with F F^T = matrix, by LAPACK's pivoted Cholesky, r = the numerical rank.

  Covariances of fewer images than dimensions are singular; pivoted Cholesky stops at their rank
  (its default tolerance, D * eps * max diagonal), so the null space's rounding noise never enters.
  """
  from scipy.linalg import lapack  # local: scipy only where FID is computed
  c, piv, rank, info = lapack.dpstrf(np.asarray(matrix, np.float64), lower=1)
  if info < 0:
    raise ValueError(f'pivoted Cholesky failed (info={info}): the covariance is not a finite '
                     'symmetric matrix.')
  factor = np.zeros((matrix.shape[0], rank))
  factor[piv - 1] = np.tril(c)[:, :rank]
  return factor


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), in float64.

  tr(sqrtm(S1 S2)) is the sum of square roots of the eigenvalues of S1 S2, which (S1 = F F^T) are
  those of the small symmetric PSD matrix F^T S2 F; eigvalsh on it is exact where
  scipy.linalg.sqrtm of the non-symmetric product returns complex or non-finite results for
  singular covariances (pytorch-fid then adds an eps offset; this never needs one), and it is
  several times faster than sqrtm or a full eigendecomposition at D = 2048.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f'mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} '
                     f'vs {s2.shape}.')
  s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
  factor = _psd_factor(s1)
  middle = factor.T @ s2 @ factor
  eig = np.linalg.eigvalsh((middle + middle.T) / 2)
  floor = len(eig) * np.finfo(np.float64).eps * float(np.abs(eig).max(initial=0.0))
  tr_covmean = np.sum(np.sqrt(np.where(eig > floor, eig, 0.0)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
