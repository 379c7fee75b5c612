"""Every configuration key of vtp-jax, with its default and a one-line reason.

Size configs (`vtp_tiny`, `vtp_s`, `vtp_b`, `vtp_l`, `vtp_h`) and variants (`ae_baseline`) start from
`get_config()` here and change a few lines. Any key can be overridden on the command line as
`--config.section.key=value`. Tags in comments follow ../shared/docs/vtp_spec.md: [P] paper, [C] code,
[HF] released config.json, [R] DINOv2/DINOv3/OpenCLIP default used because VTP's value is unknown.
"""

import math

import ml_collections


def model_config() -> ml_collections.ConfigDict:
  """The architecture. Defaults are VTP-B's, the `VTPConfig` defaults [C]."""
  m = ml_collections.ConfigDict()
  m.patch_size = 16  # pixels per patch side; latents are (H/16, W/16) [C]
  m.bottleneck_dim = 64  # latent channels d of the bias-free bottleneck [HF]
  m.bottleneck_ae_only = True  # bottleneck feeds reconstruction only; CLIP/DINO see full width [HF]
  m.clip_feat = 'cls'  # CLIP image feature: 'cls' token or 'pooled' (mean of patch tokens) [HF]
  m.clip_dim = 768  # CLIP joint embedding width (visual_proj and text_projection outputs) [C]
  m.init_logit_scale = math.log(1 / 0.07)  # CLIP log logit scale at init, OpenCLIP default [C]
  m.logit_bias = False  # True adds the SigLIP logit bias parameter (config alternative) [C]
  m.init_logit_bias = -10.0  # SigLIP logit bias at init [R OpenCLIP]

  m.encoder = ml_collections.ConfigDict()
  m.encoder.width = 768  # model width D [C]
  m.encoder.depth = 12  # number of blocks [C]
  m.encoder.heads = 12  # attention heads; head dim = width / heads = 64 [M]
  m.encoder.mlp = 'swiglu'  # 'swiglu' (three biased linears) or 'gelu' (two) [HF]
  m.encoder.mlp_ratio = 4.0  # hidden = ratio*D; SwiGLU takes 2/3 of it rounded up to 8 [C]
  m.encoder.norm = 'rmsnorm'  # 'rmsnorm' (weight only) or 'layernorm' [HF]
  m.encoder.norm_eps = 1e-5  # epsilon of every encoder norm [C]
  m.encoder.qkv_bias = True  # bias on the fused qkv projection [C]
  m.encoder.qk_norm = False  # RMSNorm(head_dim) on q and k before RoPE; off in released weights [HF]
  m.encoder.layerscale = 0.0  # LayerScale init value; 0 disables it (released: null) [HF]
  m.encoder.n_registers = 0  # storage/register tokens after CLS (released: 0) [C]
  m.encoder.drop_path_mode = 'subset'  # 'subset': DINOv2 batch-subset drop [C]; 'sample': Bernoulli
  m.encoder.clip_drop_rate = 0.0  # drop_ratio of the CLIP forward [?]
  m.encoder.ssl_drop_rate = 0.0  # drop_ratio of the SSL student forward [?] (DINOv2 ViT-L: 0.3)
  m.encoder.rec_drop_rate = 0.0  # drop_ratio of the reconstruction forward [?]

  m.rope = ml_collections.ConfigDict()
  m.rope.base = 100.0  # period base; 0 selects min_period/max_period instead [C]
  m.rope.min_period = 0.0  # smallest period when base == 0 (DINOv3 option)
  m.rope.max_period = 0.0  # largest period when base == 0 (DINOv3 option)
  m.rope.normalize_coords = 'separate'  # 'separate', 'min' or 'max': what coordinates divide by [C]
  m.rope.shift = 0.0  # training-time uniform coordinate shift in [-shift, shift]; 0 = off [C]
  m.rope.jitter = 0.0  # training-time per-axis scale exp(U(-ln j, ln j)); 0 = off [C]
  m.rope.rescale = 0.0  # training-time shared scale exp(U(-ln r, ln r)); 0 = off [C]

  m.text = ml_collections.ConfigDict()
  m.text.width = 768  # text tower width [P]
  m.text.depth = 12  # text tower blocks [P]
  m.text.heads = 12  # text attention heads [HF]
  m.text.context_length = 77  # tokens per caption [C]
  m.text.vocab_size = 49408  # CLIP BPE vocabulary [C]
  m.text.mlp_ratio = 4.0  # GELU MLP hidden = ratio*width [C]
  m.text.norm_eps = 1e-5  # LayerNorm epsilon [C]
  m.text.causal = True  # causal attention mask (OpenCLIP) [HF]

  m.decoder = ml_collections.ConfigDict()
  m.decoder.width = 768  # pixel decoder width [C]
  m.decoder.depth = 12  # pixel decoder blocks [C]
  m.decoder.heads = 12  # pixel decoder heads [C]
  m.decoder.mlp = 'swiglu'  # as encoder [HF]
  m.decoder.mlp_ratio = 4.0  # as encoder [HF]
  m.decoder.norm = 'layernorm'  # LayerNorm with bias [HF]
  m.decoder.norm_eps = 1e-6  # decoder norm epsilon [C]
  m.decoder.qkv_bias = True  # [C]
  m.decoder.qk_norm = False  # [HF]
  m.decoder.layerscale = 0.0  # [HF]

  m.dino_head = ml_collections.ConfigDict()
  m.dino_head.hidden = 2048  # MLP hidden width [R DINOv2]
  m.dino_head.bottleneck = 256  # width before the prototype layer [R DINOv2]
  m.dino_head.prototypes = 65536  # prototype count K, shared by DINO and iBOT [R DINOv2]
  m.dino_head.nlayers = 3  # MLP layers [R DINOv2]
  return m


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init, dropout and data order
  c.model = model_config()

  c.data = ml_collections.ConfigDict()
  c.data.image_size = 256  # CLIP and reconstruction image side in pixels [C][HF]

  c.precision = ml_collections.ConfigDict()
  c.precision.compute_dtype = 'bfloat16'  # activations and matmuls; parameters stay float32 [R DINOv3]
  c.precision.rope_dtype = 'bfloat16'  # 'bfloat16' reproduces the reference RoPE bit for bit [C]
  c.precision.scan_layers = True  # nn.scan over blocks: compile time independent of depth
  c.precision.remat_policy = 'none'  # 'none', 'full', 'dots', 'dots_no_batch': what blocks keep for backward
  c.precision.attention = 'xla'  # jax.nn.dot_product_attention implementation: 'xla' or 'cudnn'

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size; -1 takes the devices left over
  c.mesh.fsdp = 1  # parameter/optimizer-state sharding axis size (ZeRO-3 style)
  c.mesh.tensor = 1  # tensor-parallel axis size (heads, MLP hidden, vocab, prototypes)
  c.mesh.rules = ()  # extra (logical, mesh axes) rules placed before the defaults in sharding.py
  return c
