"""FX / torch.compile graph passes of moa-flex (installed as ``moa_flex.passes``)."""
