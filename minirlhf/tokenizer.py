"""Byte-level BPE tokenizer (trained with the `tokenizers` library) with distinct PAD, BOS and EOS tokens.

PAD != EOS on purpose: when they are the same token, masking padding out of the SFT loss also masks EOS and the
model never learns to stop (TRL #976). Every sequence is BOS + prompt + response + EOS; prompt and response are
encoded separately, so no BPE merge crosses the prompt/response boundary. The convention is read from the
tokenizer.json itself (a saved tokenizer always reloads the same way), the first that applies:
  * ours: <|pad|>, <|bos|>, <|eos|> (a file with <|bos|> or <|eos|>);
  * Llama 3's: <|begin_of_text|> / <|end_of_text|>, PAD <|finetune_right_pad_id|> where present, else a <|pad|>;
  * GPT-2's, also Qwen's and SmolLM2's: <|endoftext|> is BOS and EOS (the token the models saw between documents,
    and the one Qwen's configs name as bos_token_id), a distinct <|pad|> added after it;
  * otherwise ours, the three tokens added at the end of the user's file.
"""
import hashlib

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ENDOFTEXT = "<|endoftext|>"  # GPT-2's only special token
LLAMA3 = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>")  # BOS, EOS, PAD (3.1 on)


def convention(hf: HFTokenizer) -> tuple:
    """(pad, bos, eos) token strings for this tokenizer.json (see the module docstring)."""
    has = {t: hf.token_to_id(t) is not None for t in (BOS, EOS, ENDOFTEXT, *LLAMA3)}
    if has[BOS] or has[EOS]:
        return PAD, BOS, EOS
    if has[LLAMA3[0]] and has[LLAMA3[1]]:
        return (LLAMA3[2] if has[LLAMA3[2]] else PAD), LLAMA3[0], LLAMA3[1]
    if has[ENDOFTEXT]:
        return PAD, ENDOFTEXT, ENDOFTEXT
    return PAD, BOS, EOS


class Tokenizer:
    def __init__(self, hf: HFTokenizer):
        # pad_token, bos_token, eos_token: the strings (export_hf.py writes them into tokenizer_config.json)
        self.pad_token, self.bos_token, self.eos_token = convention(hf)
        # A user's tokenizer.json may lack our special tokens: add them (they get new ids at the end). Adding a
        # token that is already a special added token changes nothing, so a saved tokenizer reloads identically;
        # adding <|endoftext|> when it is only a plain vocabulary entry marks it special (decode drops it).
        specials = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
        missing = [t for t in dict.fromkeys((self.pad_token, self.bos_token, self.eos_token)) if t not in specials]
        if missing:
            hf.add_special_tokens(missing)
        hf.encode_special_tokens = True  # text that spells "<|eos|>" is encoded as text, never as the EOS token
        self.hf = hf
        self.pad_id, self.bos_id, self.eos_id = (hf.token_to_id(t) for t in (self.pad_token, self.bos_token,
                                                                             self.eos_token))

    @classmethod
    def train(cls, texts, vocab_size: int = 512) -> "Tokenizer":
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception with a serde message
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None

    def save(self, path):
        self.hf.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def unsampleable_ids(self, vocab_size: int) -> list:
        """Ids a policy with `vocab_size` outputs must never sample (pass them as `banned=`): PAD, BOS unless it is also
        EOS, every other special token (Qwen's <|im_start|>, Llama 3's reserved ones) and every id past this
        tokenizer's vocabulary. decode() drops them, so sampling one would make text and gold reward disagree with
        the tokens."""
        specials = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        ids = {self.pad_id, self.bos_id} | specials | set(range(self.vocab_size, vocab_size))
        ids.discard(self.eos_id)
        return sorted(i for i in ids if i < vocab_size)

    def fingerprint(self) -> str:
        """A hash of the full tokenizer definition: later stages refuse checkpoints whose tokenizer differs."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list:
        """Plain token ids of `text`, no special tokens added."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens (PAD, BOS, EOS) dropped."""
        return self.hf.decode(list(ids), skip_special_tokens=True)
