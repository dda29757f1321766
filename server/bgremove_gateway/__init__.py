"""bgremove gateway: validates streamed uploads, runs U2-Net on Triton, streams results back."""

__version__ = "0.1.0"
