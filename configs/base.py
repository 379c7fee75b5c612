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
  m.encoder.norm_eps = 1e-5  # encoder block/final norms; reference: rmsnorm 1e-5, layernorm 1e-6, layernormbf16 1e-5 [C]
  m.encoder.qkv_bias = True  # bias on the fused qkv projection [C]
  m.encoder.qk_norm = False  # RMSNorm(head_dim) on q and k before RoPE; off in released weights [HF]
  m.encoder.qk_norm_eps = 1e-5  # q/k RMSNorm epsilon, whatever the block norm [C]
  m.encoder.layerscale = 0.0  # LayerScale init value; 0 disables it (released: null) [HF]
  m.encoder.init = 'vit'  # linear init: 'vit' trunc-normal(0.02) [C]; 'fan_in' std fan_in^-0.5
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
  m.decoder.norm_eps = 1e-6  # decoder norms; the reference ties it to the type, as the encoder's [C]
  m.decoder.qkv_bias = True  # [C]
  m.decoder.qk_norm = False  # [HF]
  m.decoder.qk_norm_eps = 1e-5  # q/k RMSNorm epsilon, as encoder [C]
  m.decoder.layerscale = 0.0  # [HF]
  m.decoder.init = 'vit'  # as encoder [C]

  m.dino_head = ml_collections.ConfigDict()
  m.dino_head.hidden = 2048  # MLP hidden width [R DINOv2]
  m.dino_head.bottleneck = 256  # width before the prototype layer [R DINOv2]
  m.dino_head.prototypes = 65536  # prototype count K, shared by DINO and iBOT [R DINOv2]
  m.dino_head.nlayers = 3  # MLP layers [R DINOv2]
  return m


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init, dropout and data order
  c.task = 'tokenizer'  # what the driver trains: 'tokenizer' (VTP) or 'generation' (configs/dit_*.py)
  c.model = model_config()

  c.data = ml_collections.ConfigDict()
  # Sources (vtp_jax/data/sources.py): tfds:NAME[:SPLIT], tar:GLOB, arrayrecord:GLOB, folder:PATH,
  # shapes[:SPLIT].
  c.data.source = 'shapes'  # which records to train on; 'shapes' = embedded vtp_shapes train split
  c.data.data_dir = ''  # TFDS data dir (also where vtp_shapes is prepared); '' = TFDS default
  c.data.index_cache_dir = ''  # tar index cache folder; '' = beside each shard (or ~/.cache)
  c.data.image_key = 'image'  # TFDS feature holding the image ('a/b' for nested features)
  c.data.caption_key = 'caption'  # TFDS feature holding the caption (first one if a list)
  c.data.label_key = 'label'  # TFDS feature / tar .json field holding an int label; '' = none
  c.data.shapes_train_size = 20000  # vtp_shapes training examples; prepared once (~1 CPU-min)
  c.data.shapes_val_size = 2000  # vtp_shapes validation examples
  c.data.shapes_image_size = 64  # vtp_shapes image side in pixels
  c.data.image_size = 256  # CLIP and reconstruction image side in pixels [C][HF]
  c.data.batch_size = 16384  # global CLIP batch B of image-caption pairs [P]
  c.data.ssl_batch_fraction = 0.25  # SSL sub-batch = B/4 (4k of 16k) [P]
  c.data.rec_batch_fraction = 0.125  # reconstruction sub-batch = B/8 (2k of 16k) [P]
  c.data.global_crop_size = 224  # DINO global crop side [R DINOv2]
  c.data.local_crop_size = 96  # DINO local crop side [R DINOv2]
  c.data.n_local_crops = 8  # local crops per image [R DINOv2]
  c.data.mask_ratio_min = 0.1  # iBOT mask ratio range, low end [R DINOv2]
  c.data.mask_ratio_max = 0.5  # iBOT mask ratio range, high end; sizes the static token buffer [R]
  c.data.mask_probability = 0.5  # chance a global crop is masked at all [R DINOv2]
  # Views and masks (vtp_jax/data/views.py, masking.py); scales are area fractions of the image.
  c.data.mask_min_block_patches = 4  # smallest block area in patches [R BEiT/DINOv2]
  c.data.mask_min_aspect = 0.3  # block aspect log-uniform in [min, 1/min] [R BEiT/DINOv2]
  c.data.mask_attempts = 10  # block draws per round before a mask stops short [R BEiT/DINOv2]
  c.data.mask_max_block_fraction = 0.5  # one block adds at most this fraction of N patches [R DINOv2]
  c.data.crop_ratio = (3 / 4, 4 / 3)  # aspect range of every random resized crop [R torchvision]
  c.data.clip_crop_scale = (0.9, 1.0)  # CLIP view crop scale [R OpenCLIP] (VTP: [?])
  c.data.rec_crop_scale = (0.8, 1.0)  # reconstruction view crop scale, kept mild [?]
  c.data.rec_flip_probability = 0.5  # horizontal flip of the reconstruction view [?]
  c.data.global_crop_scale = (0.32, 1.0)  # DINO global crop scale [R DINOv2]
  c.data.local_crop_scale = (0.05, 0.32)  # DINO local crop scale [R DINOv2]
  c.data.flip_probability = 0.5  # horizontal flip of every SSL crop [R DINOv2]
  c.data.color_jitter = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue [R DINOv2]
  c.data.color_jitter_probability = 0.8  # chance the jitter applies to an SSL crop [R DINOv2]
  c.data.grayscale_probability = 0.2  # SSL crops turned grey [R DINOv2]
  c.data.blur_probability = (1.0, 0.1, 0.5)  # Gaussian blur on global 1, global 2, locals [R DINOv2]
  c.data.blur_sigma = (0.1, 2.0)  # blur sigma range in pixels, kernel 9 [R DINOv2]
  c.data.solarize_probability = 0.2  # solarise (>= 128 inverted) global crop 2 [R DINOv2]
  # Loader (vtp_jax/data/pipeline.py).
  c.data.seed = 0  # data order and augmentation seed (independent of the model seed)
  c.data.num_epochs = 0  # passes over the source; 0 repeats forever
  c.data.read_threads = 8  # Grain ReadOptions.num_threads: decode threads per worker
  c.data.read_buffer_size = 256  # Grain ReadOptions.prefetch_buffer_size: decoded records ahead
  c.data.worker_count = -1  # Grain worker processes; -1 = auto (cores less 2-8, RAM-capped); 0 = none
  c.data.decode = 'scaled'  # JPEG decode at the DCT scale the crops allow; 'full' = whole image
  c.data.views_backend = 'opencv'  # views' pixel ops in OpenCV; 'pillow' = torchvision's PIL path
  c.data.prefetch_buffer_size = 2  # batches each worker keeps ready

  c.loss = ml_collections.ConfigDict()
  c.loss.clip_weight = 1.0  # lambda_clip; 0 removes the CLIP branch from the step [P]
  c.loss.ssl_weight = 1.0  # lambda_ssl; 0 removes DINO/iBOT/KoLeo and the teacher [P]
  c.loss.rec_weight = 0.1  # lambda_rec on (L1 + LPIPS) [P]
  c.loss.clip_type = 'softmax'  # 'softmax' (released models) or 'sigmoid' (SigLIP, needs logit_bias) [C]
  c.loss.max_logit_scale = math.log(100.0)  # clamp of the log logit scale after each step [R OpenCLIP]
  c.loss.dino_weight = 1.0  # DINO CLS-token term inside L_ssl [R DINOv2]
  c.loss.ibot_weight = 1.0  # iBOT masked-patch term inside L_ssl [R DINOv2]
  c.loss.koleo_weight = 0.1  # KoLeo on pre-head global CLS features [R DINOv2]
  c.loss.student_temp = 0.1  # student softmax temperature, DINO and iBOT [R DINOv2]
  c.loss.teacher_temp = 0.07  # teacher temperature after warm-up [R DINOv2]
  c.loss.teacher_temp_warmup = 0.04  # teacher temperature at step 0 [R DINOv2]
  c.loss.teacher_temp_warmup_steps = 37500  # linear warm-up: 30 "epochs" x 1250 [R DINOv2]
  c.loss.teacher_norm = 'centering'  # 'centering' (DINOv2) or 'sinkhorn' (DINOv3) [?]
  c.loss.center_momentum = 0.9  # EMA momentum of the DINO and iBOT centres [R DINOv2]
  c.loss.sinkhorn_iterations = 3  # Sinkhorn-Knopp iterations [R DINOv2]
  c.loss.l1_weight = 1.0  # L1 inside L_rec [P]
  c.loss.lpips_weight = 1.0  # LPIPS(VGG16) inside L_rec [P]
  c.loss.l1_space = 'pixel'  # L1 on de-normalised [-1,1] pixels or 'normalized' model space [?]

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = 'adamw'  # only AdamW is implemented [R DINOv2]
  c.optim.lr = 4e-3  # base lr at lr_reference_batch; DINOv3 1e-3, OpenCLIP 5e-4 absolute [R DINOv2]
  c.optim.lr_scaling = 'sqrt'  # 'sqrt' | 'linear' | 'none'; peak = lr*sqrt(B/1024) [R DINOv2]
  c.optim.lr_reference_batch = 1024  # batch at which lr is quoted [R DINOv2]
  c.optim.warmup_steps = 12500  # 10 DINOv2 "epochs" of 1250 steps; must be <= train.steps [R]
  c.optim.schedule = 'cosine'  # after warm-up: 'cosine' to final_lr or 'constant' [R DINOv2]
  c.optim.final_lr = 1e-6  # lr at train.steps [R DINOv2]
  c.optim.b1 = 0.9  # Adam beta1 [R DINOv2]
  c.optim.b2 = 0.999  # Adam beta2; OpenCLIP uses 0.98 [R DINOv2]
  c.optim.eps = 1e-8  # Adam epsilon; OpenCLIP 1e-6 [R DINOv2]
  c.optim.weight_decay = 0.04  # cosine start; OpenCLIP constant 0.2 [R DINOv2]
  c.optim.weight_decay_end = 0.4  # cosine end at train.steps [R DINOv2]
  c.optim.layer_decay = 0.9  # encoder layer-wise lr decay; 1.0 disables [R DINOv2]
  c.optim.patch_embed_lr_mult = 0.2  # extra lr factor on encoder/patch_embed [R DINOv2]
  c.optim.clip_grad_norm = 3.0  # gradient clipping by norm; 0 disables [R DINOv2]
  c.optim.clip_grad_scope = 'global'  # 'global' norm, or 'per_tower' as DINOv2 clips per module [R]
  c.optim.freeze_last_layer_steps = 1250  # DINO prototypes frozen for 1 DINOv2 "epoch" [R DINOv2]
  c.optim.momentum = 0.992  # teacher EMA momentum at step 0, cosine schedule [R DINOv2]
  c.optim.momentum_end = 1.0  # teacher EMA momentum at train.steps [R DINOv2]

  c.train = ml_collections.ConfigDict()
  c.train.steps = 125000  # total optimizer steps (VTP's are unknown [?]); schedules end here
  # The driver (vtp_jax/driver/loop.py, launch/main.py); seeds are c.seed (model) and c.data.seed.
  c.train.checkpoint_every = 1000  # async Orbax save every N steps (and at the end and on SIGTERM)
  c.train.keep_checkpoints = 3  # newest K checkpoints kept in WORKDIR/checkpoints
  c.train.stop_after_steps = 0  # end this invocation (saving) after N steps (job time limits); 0 = off
  c.train.init_from = ''  # params folder or training workdir to start from (partial); '' = fresh
  c.train.log_every = 50  # steps per console line / metrics.jsonl row / TensorBoard scalars
  c.train.max_steps_ahead = 2  # dispatched steps the host may queue ahead of the device; 0 = unbounded
  c.train.image_log_every = 1000  # steps per input-vs-reconstruction grid in TensorBoard; 0 = never
  c.train.image_log_count = 8  # images in that grid
  c.train.accum_steps = 1  # micro-batches the global batch is split into inside one step; exact for every loss (docs/scaling.md, 'Gradient accumulation')
  c.train.nan_policy = 'stop'  # non-finite loss: 'stop' (last good checkpoint kept) or 'skip' the update
  c.train.host_malloc = 'auto'  # glibc malloc: 'auto' ('retain' on CPU hosts, else 'system'), 'retain', 'hugepages', 'system'
  c.train.peak_flops = 0.0  # peak FLOP/s of ALL devices together, for MFU on the console; 0 = no MFU
  c.train.distributed = ml_collections.ConfigDict()  # jax.distributed.initialize (several processes)
  c.train.distributed.mode = 'auto'  # 'auto' (SLURM/MPI/JAX_* env or coordinator given), 'on', 'off'
  c.train.distributed.coordinator_address = ''  # host:port of process 0; '' = detect from the cluster
  c.train.distributed.num_processes = 0  # processes in the job; 0 = detect
  c.train.distributed.process_id = -1  # this process's index; -1 = detect
  c.train.distributed.initialization_timeout = 600  # seconds each process waits for the others
  c.train.distributed.heartbeat_timeout = 100  # seconds unheard before a process counts as dead (driver/peers.py)
  c.train.distributed.cpu_collectives = 'gloo'  # CPU cross-process collectives ('gloo' or 'mpi')

  c.gan = ml_collections.ConfigDict()  # stage 2: decoder vs PatchGAN, tokenizer frozen [P]; recipe [R LDM]
  c.gan.enabled = False  # True turns the run into the decoder GAN stage (configs/vtp_*_gan.py)
  c.gan.loss = 'hinge'  # 'hinge' or 'non_saturating' discriminator/generator pair [R LDM]
  c.gan.disc_weight = 0.5  # multiplies the adaptive weight of the generator term [R VA-VAE]
  c.gan.max_adaptive_weight = 1e4  # clip of ||grad nll|| / ||grad g|| at the last layer [R LDM]
  c.gan.start_step = 0  # GAN terms off before this stage-2 step (LDM disc_start) [?]
  c.gan.disc_channels = 64  # PatchGAN base width (ndf) [R taming]
  c.gan.disc_layers = 3  # PatchGAN stride-2 layers (n_layers) [R taming]
  c.gan.lr = 1e-4  # decoder Adam lr, constant after warm-up [R LDM]
  c.gan.disc_lr = 1e-4  # discriminator Adam lr [R LDM]
  c.gan.b1 = 0.5  # Adam beta1 of both players [R LDM]
  c.gan.b2 = 0.9  # Adam beta2 of both players [R LDM]
  c.gan.weight_decay = 0.0  # decoder weight decay in stage 2 [R LDM: plain Adam]
  c.gan.warmup_steps = 0  # linear lr warm-up of both players [?]
  c.gan.clip_grad_norm = 0.0  # decoder gradient clipping by norm; 0 disables [R LDM: none]

  c.precision = ml_collections.ConfigDict()
  c.precision.compute_dtype = 'bfloat16'  # activations and matmuls; parameters stay float32 [R DINOv3]
  c.precision.rope_dtype = 'bfloat16'  # 'bfloat16' reproduces the reference RoPE bit for bit [C]
  c.precision.scan_layers = False  # False: unrolled blocks, faster steps; True: nn.scan, compile time flat in depth
  c.precision.remat_policy = 'none'  # 'none', 'full', 'dots', 'dots_no_batch': what blocks keep for backward
  c.precision.attention = 'auto'  # kernels/attention.py: 'auto' (splash on TPU, cudnn on NVIDIA GPUs where they fit, else xla), 'xla' (ours), 'cpu' (C++ float32), 'cudnn', 'splash', 'jax' (jax.nn)
  c.precision.dense = 'xla'  # kernels/dense.py, blocks' linear layers: 'xla' (jnp) or 'cpu' (C++ float32 BLAS)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size; -1 takes the devices left over
  c.mesh.fsdp = 1  # parameter/optimizer-state sharding axis size (ZeRO-3 style)
  c.mesh.tensor = 1  # tensor-parallel axis size (heads, MLP hidden, vocab, prototypes)
  c.mesh.rules = ()  # extra (logical, mesh axes) rules placed before the defaults in sharding.py

  c.evals = ml_collections.ConfigDict()  # evaluations (vtp_jax/eval), in training and standalone
  c.evals.every_steps = 0  # run evals.tasks every N training steps; 0 = never during training
  c.evals.at_end = False  # also run evals.tasks after the last training step
  c.evals.tasks = 'zero_shot,linear_probe,reconstruction'  # comma list run by eval.run_evals
  c.evals.dataset = 'tfds:imagenet2012:validation'  # what is measured (spec 4.1: ImageNet val) [C]
  c.evals.train_dataset = 'tfds:imagenet2012:train'  # where the linear probe is fitted [C]
  c.evals.max_examples = 10000  # evenly spaced examples of evals.dataset; 0 = all (paper: 50k) [?]
  c.evals.max_train_examples = 50000  # evenly spaced probe-fitting examples; 0 = all [?]
  c.evals.batch_size = 64  # images per tokenizer call (the last batch is padded, no recompile)
  c.evals.templates = 'auto'  # 'auto' (shapes->'shapes', else 'openai' 80) |openai|simple|shapes|name
  c.evals.class_names = ''  # text file, one class name a line, overriding the dataset's names
  c.evals.probe_n_blocks = '1,4'  # CLS tokens of the last n blocks (+ mean patch token) [C DINOv2]
  c.evals.probe_latent_pool = 'mean'  # bottleneck-latent probe input: 'mean' over tokens, 'flatten' [?]
  c.evals.probe_lrs = '1e-5,2e-5,5e-5,1e-4,2e-4,5e-4,1e-3,2e-3,5e-3,1e-2,2e-2,5e-2,0.1'  # x B/256 [C]
  c.evals.probe_optimizer = 'sgd'  # 'sgd' (momentum 0.9, wd 0, cosine [C DINOv2]) or 'adamw'
  c.evals.probe_steps = 1000  # probe iterations (DINOv2: 12500 at batch 1024) [?]
  c.evals.probe_batch_size = 256  # probe mini-batch (DINOv2: 128/GPU x 8) [?]
  c.evals.probe_factors = True  # vtp_shapes: also probe colour and shape, each alone [ours]
  c.evals.probe_select = 'eval'  # pick the lr on the eval set (DINOv2) or a 'holdout' 10% of train
  c.evals.fid_weights = ''  # converted FID InceptionV3 weights (docs/evaluation.md); '' skips rFID
  c.evals.seed = 0  # probe init and sampling, latent-stats subset
  return c
