"""FID: Fréchet distance against SciPy's sqrtm formula, statistics against np.cov, the Inception
architecture against torchvision's published parameter count, plumbing with random weights, and
the torch-name weight converter."""

import numpy as np
import pytest
from scipy import linalg

from vtp_jax.eval import fid
from vtp_jax.eval import fid_weights


def _scipy_frechet(mu1, s1, mu2, s2):
  """pytorch-fid's calculate_frechet_distance, verbatim in substance."""
  diff = mu1 - mu2
  covmean = linalg.sqrtm(s1.dot(s2))
  if not np.isfinite(covmean).all():
    offset = np.eye(s1.shape[0]) * 1e-6
    covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
  covmean = covmean.real
  return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _random_stats(rng, dim, n):
  x = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) * 0.3 + rng.normal(size=dim)
  return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_matches_scipy_sqrtm_formula():
  rng = np.random.default_rng(0)
  for dim, n in ((8, 50), (64, 500), (32, 20)):  # the last is rank-deficient, as small FID sets are
    mu1, s1 = _random_stats(rng, dim, n)
    mu2, s2 = _random_stats(rng, dim, n)
    want = _scipy_frechet(mu1, s1, mu2, s2)
    assert want > 1.0
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-6)
  # Hand-computable case: diagonal covariances, sqrtm(S1 S2) = diag(sqrt(a b)).
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
  want = 1.0 + (a + b - 2 * np.sqrt(a * b)).sum()  # means differ by (1, 0, 0)
  got = fid.frechet_distance(np.array([1.0, 0, 0]), np.diag(a), np.zeros(3), np.diag(b))
  assert got == pytest.approx(want, rel=1e-12)
  with pytest.raises(ValueError, match='mismatched'):
    fid.frechet_distance(mu1, s1, mu2[:3], s2)


def test_running_stats_equal_numpy_mean_and_cov():
  rng = np.random.default_rng(1)
  acts = rng.standard_normal((37, 6)).astype(np.float32) + 5.0
  stats = fid.RunningStats(6)
  for chunk in np.array_split(acts, 4):
    stats.update(chunk)
  mu, cov = stats.mean_cov()
  np.testing.assert_allclose(mu, acts.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(cov, np.cov(acts.astype(np.float64), rowvar=False), rtol=1e-9)


def test_inception_layout_matches_torchvision_parameter_count():
  shapes = fid.param_shapes()
  convs = sum(int(np.prod(s)) for k, s in shapes.items() if k.endswith('/kernel'))
  bn_channels = sum(s[0] for k, s in shapes.items() if k.endswith('/scale'))
  # torchvision inception_v3: 27,161,264 parameters = these convs + 2 per BatchNorm channel
  # + AuxLogits (3,326,696) + fc (2,049,000); Keras InceptionV3(include_top=False) counts
  # 21,802,784 = convs + 3 per BatchNorm channel (beta, moving mean, moving variance).
  assert convs + 2 * bn_channels + 3_326_696 + 2_049_000 == 27_161_264
  assert convs + 3 * bn_channels == 21_802_784
  assert shapes['Conv2d_1a_3x3/conv/kernel'] == (3, 3, 3, 32)
  assert shapes['Mixed_7c/branch_pool/conv/kernel'] == (1, 1, 2048, 192)
  assert shapes['Mixed_6e/branch7x7dbl_5/conv/kernel'] == (1, 7, 192, 192)


@pytest.fixture(scope='module')
def random_inception():
  return fid.init_params(seed=0)


def test_random_inception_plumbing_and_fid_of_a_set_with_itself(random_inception):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (6, 40, 48, 3), dtype=np.uint8)
  acts = fid.activations(random_inception, images, resize_to=75)
  assert acts.shape == (6, 2048) and acts.dtype == np.float32
  assert np.all(np.isfinite(acts)) and np.all(acts >= 0)  # pool3 follows ReLUs
  assert np.std(acts, axis=0).max() > 0  # different images, different features
  stats = fid.RunningStats()
  stats.update(acts)
  mu, cov = stats.mean_cov()
  assert abs(fid.frechet_distance(mu, cov, mu, cov)) < 1e-12 * np.trace(cov)
  other = fid.RunningStats()
  other.update(fid.activations(random_inception, 255 - images, resize_to=75))
  assert fid.frechet_distance(mu, cov, *other.mean_cov()) > 0
  with pytest.raises(ValueError, match='uint8'):
    fid.activations(random_inception, images.astype(np.float32), resize_to=75)


def _to_torch_names(params):
  """Hand-written inverse of the converter: Flax tree -> pytorch-fid state-dict names/layouts."""
  state = {'fc.weight': np.zeros((1008, 2048), np.float32), 'fc.bias': np.zeros(1008, np.float32)}

  def walk(node, prefix):
    if 'conv' in node:
      # Contiguous, as torch's state dict is: safetensors writes a strided view's raw buffer.
      kernel = node['conv']['kernel'].transpose(3, 2, 0, 1)  # HWIO -> OIHW
      state[f'{prefix}.conv.weight'] = np.ascontiguousarray(kernel)
      for ours, theirs in (('scale', 'weight'), ('bias', 'bias'), ('mean', 'running_mean'),
                           ('var', 'running_var')):
        state[f'{prefix}.bn.{theirs}'] = node[ours]
      state[f'{prefix}.bn.num_batches_tracked'] = np.array(0, np.int64)
      return
    for key, child in node.items():
      walk(child, f'{prefix}.{key}' if prefix else key)
  walk(params, '')
  return state


def test_converter_reads_torch_names_from_npz_and_safetensors(random_inception, tmp_path):
  from safetensors.numpy import save_file
  state = _to_torch_names(random_inception)
  assert state['Mixed_5b.branch5x5_2.conv.weight'].shape == (64, 48, 5, 5)  # torch OIHW
  np.savez(tmp_path / 'pt.npz', **state)
  save_file(state, str(tmp_path / 'pt.safetensors'))
  want = random_inception['Mixed_5b']['branch5x5_2']['conv']['kernel']
  for name in ('pt.npz', 'pt.safetensors'):
    params = fid_weights.load_params(tmp_path / name)
    np.testing.assert_array_equal(params['Mixed_5b']['branch5x5_2']['conv']['kernel'], want)
    np.testing.assert_array_equal(params['Mixed_7c']['branch_pool']['var'],
                                  state['Mixed_7c.branch_pool.bn.running_var'])
  fid_weights.save(params, tmp_path / 'converted.npz')
  again = fid_weights.load_params(tmp_path / 'converted.npz')
  np.testing.assert_array_equal(again['Conv2d_4a_3x3']['conv']['kernel'],
                                random_inception['Conv2d_4a_3x3']['conv']['kernel'])

  del state['Mixed_6a.branch3x3.bn.running_mean']
  state['Mixed_9z.branch1x1.conv.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  np.savez(tmp_path / 'bad.npz', **state)
  with pytest.raises(ValueError, match=r'1 missing \[Mixed_6a/branch3x3/mean\].*1 unexpected'):
    fid_weights.load_params(tmp_path / 'bad.npz')
  with pytest.raises(ValueError, match='torch'):
    fid_weights.read_arrays(tmp_path / 'weights.pth')


def test_fid_pools_exclude_padding_like_pytorch_fid():
  ones = np.ones((1, 4, 4, 1), np.float32)
  # F.avg_pool2d(3, 1, 1, count_include_pad=False): a corner averages its 4 real pixels -> 1,
  # where count_include_pad=True would give 4/9.
  np.testing.assert_allclose(np.asarray(fid._avg_pool(ones)), 1.0, rtol=1e-6)
  # F.max_pool2d(3, 1, 1) pads with -inf: an all-negative map keeps its values, never 0.
  neg = -np.arange(1, 17, dtype=np.float32).reshape(1, 4, 4, 1)
  assert np.asarray(fid._max_pool(neg, stride=1, pad=1))[0, 0, 0, 0] == -1.0
  assert np.asarray(fid._max_pool(neg)).shape == (1, 1, 1, 1)  # 3x3 stride 2, no padding
