"""minirlhf: a small, readable RLHF pipeline (SFT -> reward model -> PPO / DPO) written from scratch in PyTorch."""
