"""Model FLOPs utilisation against the card the run is on.

MFU = training FLOPs per token (GPT.flops_per_token: 6N + 12 L d T, PaLM appendix B) x tokens/s / the card's
dense bf16 peak. The peaks are the vendors' datasheet numbers for dense (not 2:4 sparse) bf16 tensor-core math;
an unknown card gives None unless --peak-tflops says what to use.
"""
import torch

# (substring of torch.cuda.get_device_name(), dense bf16 peak in FLOP/s); the first match wins, so longer names
# come before the shorter names they contain (H100 PCIe before H100, L40S before L40 before L4, A100 before A10).
PEAK_BF16_FLOPS = [
    ("B200", 2250e12), ("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("H800", 989e12), ("A100", 312e12), ("A800", 312e12), ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("RTX A6000", 155e12),
]


def device_peak_flops(name: str = None, peak_tflops: float = None):
    """Dense bf16 peak FLOP/s of the card called `name` (default: the current CUDA device), or peak_tflops * 1e12
    when given (it overrides the table). None when the card is unknown or there is no CUDA device."""
    if peak_tflops:
        return float(peak_tflops) * 1e12
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops):
    """Model FLOPs utilisation in [0, 1], or None without a known peak."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops else None
