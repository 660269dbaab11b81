"""nsft-ray: align vision-language models with nSFT and compare it with SFT, DPO and PPO on Ray."""

__version__ = "0.1.0"

__all__ = ["__version__"]
