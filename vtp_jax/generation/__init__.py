"""Downstream generation on the tokenizer's latents: LightningDiT, flow matching, ODE sampling."""
