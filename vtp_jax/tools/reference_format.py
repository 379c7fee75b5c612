"""The released VTP checkpoint format (HF `VTPModel` state dict + config.json, spec 5) and its exact
correspondence with our parameter tree, in both directions.

One table of rules maps each PyTorch key pattern to our path and a layout transform (transpose,
head split, squeeze) whose inverse is used on export, so import and export cannot drift apart.
Legacy training checkpoints use `proj.` and `transformer.` instead of `visual_proj.` and
`text_transformer.`, and add the DINO head and the EMA teacher (`teacher_trunk`, `teacher_dino_head`).
`read_safetensors` reads a .safetensors file, local or in a bucket.
"""

import dataclasses
import math
import re

import ml_collections
import ml_dtypes
import numpy as np

from configs import base as base_config
from vtp_jax import paths

# safetensors dtype names -> NumPy dtypes; bfloat16 and the float8s come from ml_dtypes (what
# safetensors' own file reader returns; its bytes reader, safetensors.numpy.load, lacks them).
_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2, 'I64': np.int64,
    'U64': np.uint64, 'I32': np.int32, 'U32': np.uint32, 'I16': np.int16, 'U16': np.uint16,
    'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


def read_safetensors(path) -> dict:
  """{name: np.ndarray (read-only)} of a .safetensors file, local or in a bucket: its bytes are
  read through vtp_jax.paths and parsed by safetensors."""
  from safetensors import deserialize  # pylint: disable=g-import-not-at-top
  out = {}
  for name, view in deserialize(paths.path(path).read_bytes()):
    if view['dtype'] not in _SAFETENSORS_DTYPES:
      raise ValueError(f'{path}: tensor {name} has dtype {view["dtype"]}, which this reader does '
                       f'not know ({sorted(_SAFETENSORS_DTYPES)}).')
    dtype = _SAFETENSORS_DTYPES[view['dtype']]
    out[name] = np.frombuffer(view['data'], dtype).reshape(view['shape'])
  return out

# Keys that exist in the reference but hold nothing we store: buffers we recompute (and verify), and
# the EMA copy of the CLIP projection that no forward pass ever reads (spec 1.9).
DERIVED_KEYS = re.compile(r'^(teacher_)?(trunk|pixel_decoder)\.rope_embed\.periods$')
UNUSED_KEYS = re.compile(r'^teacher_proj\.weight$')

# The reference's norm classes by their config.json name -> (our norm, its eps). The reference fixes
# each class's eps in code, so the name alone decides it, in the encoder and the decoder alike:
# `layernorm` is LayerNorm(eps=1e-6), `layernormbf16` LayerNorm(eps=1e-5) with float32 statistics
# (ours always keeps statistics in float32), `rmsnorm` RMSNorm(eps=1e-5).
NORM_TYPES = {'layernorm': ('layernorm', 1e-6), 'layernormbf16': ('layernorm', 1e-5),
              'rmsnorm': ('rmsnorm', 1e-5)}
# q/k norms are RMSNorm(head_dim, eps=1e-5) whatever the block norm; the text tower's LayerNorms
# (OpenCLIP) are eps 1e-5 (spec, "Text tower").
QK_NORM_EPS = 1e-5
TEXT_NORM_EPS = 1e-5


def norm_from_reference(name: str, where: str) -> tuple[str, float]:
  """(our norm type, eps) for the reference's `<tower>_norm_layer` value `name`."""
  if name not in NORM_TYPES:
    raise ValueError(f'config.json has {where}={name!r}; the released format knows '
                     f'{sorted(NORM_TYPES)}.')
  return NORM_TYPES[name]


def norm_to_reference(norm: str, eps: float, where: str) -> str:
  """The reference norm class that computes our (norm, eps); an error where none does."""
  for name, (ours, ref_eps) in NORM_TYPES.items():
    if ours == norm and math.isclose(eps, ref_eps, rel_tol=1e-9):
      return name
  choices = ', '.join(f'{n} eps {e:g}' for n, e in sorted(set(NORM_TYPES.values())))
  raise ValueError(f'{where}: norm {norm!r} with eps {eps:g} has no class in the released '
                   f'format (it has {choices}); set the eps to one of these to export.')


def _check_eps(eps: float, want: float, key: str) -> None:
  if not math.isclose(eps, want, rel_tol=1e-9):
    raise ValueError(f'{key}={eps:g}, but the released format fixes it at {want:g}; set '
                     f'{key}={want:g} to export.')


@dataclasses.dataclass(frozen=True)
class Rule:
  torch: str  # regex over the PyTorch key; groups fill `ours`
  ours: str  # our '/'-joined path, with {0}, {1} for the regex groups
  kind: str  # layout transform, see `to_ours` / `to_torch`
  tower: str = ''  # 'encoder', 'decoder' or 'text': whose head count splits qkv


def _block_rules(torch_prefix: str, ours_prefix: str, tower: str, text: bool = False):
  t, o = torch_prefix, ours_prefix
  if text:
    names = [('ln_1', 'norm1'), ('ln_2', 'norm2')]
    attn = [(r'attn\.in_proj_weight', 'attn/qkv/kernel', 'qkv_kernel'),
            (r'attn\.in_proj_bias', 'attn/qkv/bias', 'qkv_bias'),
            (r'attn\.out_proj\.weight', 'attn/proj/kernel', 'out_kernel'),
            (r'attn\.out_proj\.bias', 'attn/proj/bias', 'identity')]
    mlp = [('mlp.c_fc', 'mlp/fc1'), ('mlp.c_proj', 'mlp/fc2')]
  else:
    names = [('norm1', 'norm1'), ('norm2', 'norm2')]
    attn = [(r'attn\.qkv\.weight', 'attn/qkv/kernel', 'qkv_kernel'),
            (r'attn\.qkv\.bias', 'attn/qkv/bias', 'qkv_bias'),
            (r'attn\.proj\.weight', 'attn/proj/kernel', 'out_kernel'),
            (r'attn\.proj\.bias', 'attn/proj/bias', 'identity'),
            (r'attn\.q_norm\.weight', 'attn/q_norm/scale', 'identity'),
            (r'attn\.k_norm\.weight', 'attn/k_norm/scale', 'identity'),
            (r'ls1\.gamma', 'ls1/gamma', 'identity'),
            (r'ls2\.gamma', 'ls2/gamma', 'identity')]
    mlp = [(f'mlp.{n}', f'mlp/{n}') for n in ('w1', 'w2', 'w3', 'fc1', 'fc2')]
  rules = []
  for tn, on in names:
    rules.append(Rule(rf'{t}\.(\d+)\.{tn}\.weight', f'{o}/blocks_{{0}}/{on}/scale', 'identity'))
    rules.append(Rule(rf'{t}\.(\d+)\.{tn}\.bias', f'{o}/blocks_{{0}}/{on}/bias', 'identity'))
  for tn, on, kind in attn:
    rules.append(Rule(rf'{t}\.(\d+)\.{tn}', f'{o}/blocks_{{0}}/{on}', kind, tower))
  for tn, on in mlp:
    rules.append(Rule(rf'{t}\.(\d+)\.{re.escape(tn)}\.weight', f'{o}/blocks_{{0}}/{on}/kernel',
                      'linear'))
    rules.append(Rule(rf'{t}\.(\d+)\.{re.escape(tn)}\.bias', f'{o}/blocks_{{0}}/{on}/bias',
                      'identity'))
  return rules


def _trunk_rules(torch_prefix: str, ours_prefix: str):
  t, o = torch_prefix, ours_prefix
  return [
      Rule(rf'{t}\.cls_token', f'{o}/cls_token', 'token_111'),
      Rule(rf'{t}\.mask_token', f'{o}/mask_token', 'token_11'),
      Rule(rf'{t}\.storage_tokens', f'{o}/registers', 'token_1'),
      Rule(rf'{t}\.patch_embed\.proj\.weight', f'{o}/patch_embed/kernel', 'conv'),
      Rule(rf'{t}\.patch_embed\.proj\.bias', f'{o}/patch_embed/bias', 'identity'),
      Rule(rf'{t}\.norm\.weight', f'{o}/norm/scale', 'identity'),
      Rule(rf'{t}\.norm\.bias', f'{o}/norm/bias', 'identity'),
      Rule(rf'{t}\.feature_bottleneck\.weight', f'{o}/bottleneck/kernel', 'linear'),
  ] + _block_rules(rf'{t}\.blocks', o, 'encoder')


def _dino_head_rules(torch_prefix: str, ours_prefix: str):
  t, o = torch_prefix, ours_prefix
  return [
      Rule(rf'{t}\.mlp\.(\d+)\.weight', f'{o}/mlp_{{0}}/kernel', 'linear_seq'),
      Rule(rf'{t}\.mlp\.(\d+)\.bias', f'{o}/mlp_{{0}}/bias', 'identity_seq'),
      Rule(rf'{t}\.last_layer\.weight_g', f'{o}/g', 'weight_g'),
      Rule(rf'{t}\.last_layer\.weight_v', f'{o}/v', 'identity'),  # both (K, bottleneck)
  ]


def rules(legacy: bool) -> list[Rule]:
  """All rules for the HF (`legacy=False`) or the legacy training (`legacy=True`) key names."""
  text_prefix = 'transformer' if legacy else 'text_transformer'
  out = _trunk_rules('trunk', 'params/encoder') + [
      Rule(r'proj\.weight' if legacy else r'visual_proj\.weight', 'params/clip/proj/kernel',
           'linear'),
      Rule(r'logit_scale', 'params/clip/logit_scale', 'identity'),
      Rule(r'logit_bias', 'params/clip/logit_bias', 'identity'),
      Rule(r'positional_embedding', 'params/text/positional_embedding', 'identity'),
      Rule(r'text_projection', 'params/text/projection', 'identity'),
      Rule(r'token_embedding\.weight', 'params/text/token_embedding/embedding', 'identity'),
      Rule(r'ln_final\.weight', 'params/text/ln_final/scale', 'identity'),
      Rule(r'ln_final\.bias', 'params/text/ln_final/bias', 'identity'),
      Rule(r'pixel_decoder\.proj_in\.weight', 'params/decoder/proj_in/kernel', 'conv1x1'),
      Rule(r'pixel_decoder\.proj_in\.bias', 'params/decoder/proj_in/bias', 'identity'),
      Rule(r'pixel_decoder\.norm\.weight', 'params/decoder/norm/scale', 'identity'),
      Rule(r'pixel_decoder\.norm\.bias', 'params/decoder/norm/bias', 'identity'),
      Rule(r'pixel_decoder\.proj_out\.weight', 'params/decoder/proj_out/kernel', 'conv1x1'),
      Rule(r'pixel_decoder\.proj_out\.bias', 'params/decoder/proj_out/bias', 'identity'),
  ]
  out += _block_rules(r'pixel_decoder\.blocks', 'params/decoder', 'decoder')
  out += _block_rules(rf'{text_prefix}\.resblocks', 'params/text', 'text', text=True)
  if legacy:
    out += _dino_head_rules('dino_head', 'params/dino_head')
    out += _trunk_rules('teacher_trunk', 'teacher/encoder')
    out += _dino_head_rules('teacher_dino_head', 'teacher/dino_head')
  return out


def to_ours(kind: str, x: np.ndarray, heads: int) -> np.ndarray:
  """PyTorch tensor -> our array for one rule kind."""
  if kind in ('identity', 'identity_seq'):
    return x
  if kind in ('linear', 'linear_seq'):
    return x.T
  if kind == 'conv':  # (O, I, kh, kw) -> (kh, kw, I, O)
    return x.transpose(2, 3, 1, 0)
  if kind == 'conv1x1':  # (O, I, 1, 1) -> (I, O)
    return x[:, :, 0, 0].T
  if kind in ('token_111', 'token_11', 'token_1'):
    return x.reshape(x.shape[-2:]) if kind == 'token_1' else x.reshape(-1)
  if kind == 'weight_g':  # (K, 1) -> (K,)
    return x.reshape(-1)
  if kind == 'qkv_kernel':  # (3D, D) -> (D, 3, H, Dh); q, k, v then heads, as the reshape in spec 1.3
    d = x.shape[1]
    return x.T.reshape(d, 3, heads, -1)
  if kind == 'qkv_bias':
    return x.reshape(3, heads, -1)
  if kind == 'out_kernel':  # (D, H*Dh) -> (H, Dh, D)
    return x.T.reshape(heads, -1, x.shape[0])
  raise ValueError(f'unknown rule kind {kind!r}')


def to_torch(kind: str, x: np.ndarray) -> np.ndarray:
  """The inverse of `to_ours`."""
  if kind in ('identity', 'identity_seq'):
    return x
  if kind in ('linear', 'linear_seq'):
    return x.T
  if kind == 'conv':
    return x.transpose(3, 2, 0, 1)
  if kind == 'conv1x1':
    return x.T[:, :, None, None]
  if kind == 'token_111':
    return x.reshape(1, 1, -1)
  if kind == 'token_11':
    return x.reshape(1, -1)
  if kind == 'token_1':
    return x[None]
  if kind == 'weight_g':
    return x.reshape(-1, 1)
  if kind == 'qkv_kernel':
    return x.reshape(x.shape[0], -1).T
  if kind == 'qkv_bias':
    return x.reshape(-1)
  if kind == 'out_kernel':
    return x.reshape(-1, x.shape[-1]).T
  raise ValueError(f'unknown rule kind {kind!r}')


def flatten(tree, prefix: str = '') -> dict:
  """Nested dict -> {'a/b/c': leaf}."""
  out = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else key
    if isinstance(value, dict):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def unflatten(flat: dict) -> dict:
  """{'a/b/c': leaf} -> nested dict."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def dino_mlp_index(torch_index: int) -> int:
  """DINOv2 puts GELUs between the linears, so torch mlp.0/2/4 are our mlp_0/1/2."""
  return torch_index // 2


# ---------------------------------------------------------------------------------------------
# config.json <-> our config.

_FFN = {'swiglu': 'swiglu', 'mlp': 'gelu', 'gelu': 'gelu'}
# Keys with these values are the only ones we implement; anything else is refused by name.
_REQUIRED = {'text_pool_type': 'argmax', 'text_proj_type': 'linear', 'text_proj_bias': False,
             'text_quick_gelu': False, 'text_embed_cls': False, 'text_output_tokens': False,
             'nonscalar_logit_scale': False}


def config_from_reference(ref: dict, clip_dim: int) -> ml_collections.ConfigDict:
  """Our config (base defaults + the architecture in a released config.json)."""
  for key, want in _REQUIRED.items():
    if key in ref and ref[key] not in (want, None):
      raise ValueError(f'config.json has {key}={ref[key]!r}; only {want!r} is supported.')
  for key in ('text_ls_init_value',):
    if ref.get(key) is not None:
      raise ValueError(f'config.json has {key}={ref[key]!r}; only null is supported.')
  c = base_config.get_config()
  m = c.model
  m.patch_size = ref.get('vision_patch_size', m.patch_size)
  m.bottleneck_dim = ref['vision_feature_bottleneck']
  m.bottleneck_ae_only = ref.get('vision_bottleneck_ae_only', True)
  m.clip_feat = ref.get('vision_clip_feat', 'cls')
  m.clip_dim = clip_dim
  if ref.get('init_logit_scale') is not None:
    m.init_logit_scale = float(ref['init_logit_scale'])
  m.logit_bias = ref.get('init_logit_bias') is not None
  if m.logit_bias:
    m.init_logit_bias = float(ref['init_logit_bias'])
  for ours, prefix in ((m.encoder, 'vision'), (m.decoder, 'decoder')):
    ours.width = ref[f'{prefix}_embed_dim']
    ours.depth = ref[f'{prefix}_depth']
    ours.heads = ref[f'{prefix}_num_heads']
    ours.mlp = _FFN[ref.get(f'{prefix}_ffn_layer', 'swiglu')]
    ours.mlp_ratio = float(ref.get(f'{prefix}_mlp_ratio', ref.get('vision_mlp_ratio', 4.0)))
    # The reference defaults a missing `<tower>_norm_layer` to rmsnorm for the encoder and
    # layernorm for the decoder, which is what our config defaults are.
    default = {'vision': 'rmsnorm', 'decoder': 'layernorm'}[prefix]
    ours.norm, ours.norm_eps = norm_from_reference(ref.get(f'{prefix}_norm_layer') or default,
                                                   f'{prefix}_norm_layer')
    ours.qk_norm = bool(ref.get(f'{prefix}_use_qk_norm', False))
    ours.qk_norm_eps = QK_NORM_EPS
    ours.layerscale = float(ref.get(f'{prefix}_init_values') or 0.0)
  t = m.text
  t.width = ref['text_embed_dim']
  t.depth = ref['text_depth']
  t.heads = ref['text_num_heads']
  t.context_length = ref.get('text_context_length', 77)
  t.vocab_size = ref.get('text_vocab_size', 49408)
  t.mlp_ratio = float(ref.get('text_mlp_ratio', 4.0))
  t.causal = not ref.get('text_no_causal_mask', False)
  t.norm_eps = TEXT_NORM_EPS
  c.data.image_size = ref.get('image_size', c.data.image_size)
  return c


def reference_from_config(c) -> dict:
  """The config.json fields of the released format for our config."""
  m = c.model
  inverse_ffn = {'swiglu': 'swiglu', 'gelu': 'mlp'}
  ref = {'model_type': 'vtp', 'architectures': None, 'image_size': c.data.image_size,
         'train_clip': True, 'train_reconstruction': True,
         'vision_patch_size': m.patch_size, 'vision_feature_bottleneck': m.bottleneck_dim,
         'vision_bottleneck_ae_only': m.bottleneck_ae_only, 'vision_clip_feat': m.clip_feat,
         'init_logit_scale': None,
         'init_logit_bias': m.init_logit_bias if m.logit_bias else None,
         'nonscalar_logit_scale': False}
  if not math.isclose(m.init_logit_scale, math.log(1 / 0.07), rel_tol=1e-6):
    ref['init_logit_scale'] = m.init_logit_scale
  for ours, prefix, key in ((m.encoder, 'vision', 'model.encoder'),
                            (m.decoder, 'decoder', 'model.decoder')):
    norm_layer = norm_to_reference(ours.norm, ours.norm_eps, f'{key}.norm/norm_eps')
    if ours.qk_norm:
      _check_eps(ours.qk_norm_eps, QK_NORM_EPS, f'{key}.qk_norm_eps')
    ref.update({f'{prefix}_embed_dim': ours.width, f'{prefix}_depth': ours.depth,
                f'{prefix}_num_heads': ours.heads, f'{prefix}_ffn_layer': inverse_ffn[ours.mlp],
                f'{prefix}_norm_layer': norm_layer, f'{prefix}_use_qk_norm': ours.qk_norm,
                f'{prefix}_init_values': ours.layerscale or None})
  ref['vision_mlp_ratio'] = m.encoder.mlp_ratio
  _check_eps(m.text.norm_eps, TEXT_NORM_EPS, 'model.text.norm_eps')
  ref.update({'text_embed_dim': m.text.width, 'text_depth': m.text.depth,
              'text_num_heads': m.text.heads, 'text_context_length': m.text.context_length,
              'text_vocab_size': m.text.vocab_size, 'text_mlp_ratio': m.text.mlp_ratio,
              'text_no_causal_mask': not m.text.causal, 'text_pad_id': 0,
              'text_pool_type': 'argmax', 'text_proj_type': 'linear', 'text_proj_bias': False,
              'text_quick_gelu': False, 'text_embed_cls': False, 'text_output_tokens': False,
              'text_ls_init_value': None})
  return ref
