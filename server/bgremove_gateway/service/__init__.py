"""The gateway's serving side: lifecycle, the servicer, each call's life, refused uploads read out."""
