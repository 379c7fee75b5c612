"""Evaluations of a VTP tokenizer: zero-shot classification, linear probes, reconstruction (PSNR,
SSIM, LPIPS, rFID). `run_evals(tokenizer, config)` runs those named in `config.evals`; the command
line is `python -m vtp_jax.eval` (__main__.py). Submodules are imported lazily, so importing this
package costs nothing.
"""


def run_evals(tokenizer_or_params, config) -> dict:
  """{'{task}/{metric}': float} for every task in config.evals.tasks (see runner.py)."""
  from vtp_jax.eval import runner
  return runner.run_evals(tokenizer_or_params, config)
