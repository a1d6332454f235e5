"""Export a minirlhf run as a Hugging Face transformers directory: GPT-2, or Llama / Qwen2 / Qwen3 for a model of
that family (train_sft.py --arch, or one imported with --init-from).

    python export_hf.py out/ppo hf/ppo     # policy  -> GPT2LMHeadModel (LlamaForCausalLM, Qwen2ForCausalLM, ...)
    python export_hf.py out/rm  hf/rm      # reward  -> GPT2ForSequenceClassification (one label; Llama..., ...)

The export is read back with minirlhf's importer and its logits (scores) compared with the run's on random
tokens. What the directory holds, how a reward model's constants are folded, and how to use it: docs/huggingface.md.
"""
import argparse

import torch

from minirlhf.harness.checkpoint import load_run
from minirlhf.harness.cli import run
from minirlhf.interop.hf import export_hf
from minirlhf.model import GPT, ScalarModel


def load_model(run_dir, flag):
    """(GPT or ScalarModel in eval mode, tokenizer) from a run directory or an HF directory."""
    state, cfg, tok, config = load_run(run_dir, flag)
    model = ScalarModel(cfg) if config["kind"] == "reward" else GPT(cfg)
    model.load_state_dict(state)
    return model.eval(), tok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a policy or reward run directory (or an HF directory)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (must not exist or be empty)")
    a = parser.parse_args(argv)
    info = export_hf(*load_run(a.run_dir, "RUN_DIR"), a.out_dir)
    # read both back and compare on random tokens: the export must be the same function
    before, tok = load_model(a.run_dir, "RUN_DIR")
    after, _ = load_model(a.out_dir, "OUT_DIR")
    idx = torch.randint(tok.vocab_size, (2, min(32, before.config.block_size)),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (before(idx).float() - after(idx).float()).abs().max().item()
    print(f"wrote {a.out_dir}: {info['architecture']}, vocab {info['vocab_size']}, n_positions {info['n_positions']}; "
          f"max |difference| after reimport {diff:.2e}")
    if info["score_offset"]:
        why = "the reward head has zero weight" if info["architecture"].startswith("GPT2") else "RMSNorm has no bias"
        print(f"note: {why}, so the reward's offset {info['score_offset']:+.6f} could not be folded in; it is in "
              f"config.json as minirlhf_score_offset (add it to transformers' score)")


if __name__ == "__main__":
    run(main)
