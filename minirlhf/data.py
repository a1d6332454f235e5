"""JSONL readers and hand-written batching.

Records (one JSON object per line): SFT {"prompt", "completion"} or {"text"} (an empty prompt, loss on all of
it); preferences {"prompt", "chosen", "rejected"} (the field names TRL and most public sets use). The completion
is appended to the prompt as is, so it usually starts with a space. Every sequence is BOS + prompt + response +
EOS: SFT batches are right-padded with a loss mask on completion tokens and EOS only; generation and scoring
batches are [prompt, left-padded | response, right-padded], so every row's response starts at the same column P
and the model computes positions from the attention mask.
"""
import json
import math
from pathlib import Path

import torch

from minirlhf.utils import UserError


class DataError(UserError):
    pass


class _NonFinite(ValueError):
    pass


def _reject_constant(name):
    """json.loads hook for the non-standard NaN / Infinity / -Infinity literals Python's json accepts."""
    raise _NonFinite(name)


def _finite_float(text):
    """json.loads hook for floats: 1e999 parses to inf, which is no more data than a literal Infinity."""
    x = float(text)
    if not math.isfinite(x):
        raise _NonFinite(text)
    return x


def read_jsonl(path, required: tuple, alternatives: tuple = ()) -> list:
    """Read a JSONL file; every record needs string fields `required` (or all of `alternatives`).
    Each returned dict gets "_where" = "file:line" for later error messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = []
    with open(path, "rb") as f:  # bytes, decoded per line: a bad byte is reported with its line number
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write: not part of the data
            if not line.strip():
                continue
            try:
                rec = json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            except _NonFinite as e:
                raise DataError(f"{where}: {e} is not a finite number (NaN and infinities are not valid "
                                "data)") from None
            except RecursionError:
                raise DataError(f"{where}: not valid data (JSON nested too deeply)") from None
            except ValueError as e:  # an integer of more than 4300 digits
                raise DataError(f"{where}: not valid data ({str(e).splitlines()[0][:120]})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            # a record with any of the required fields is judged against them, otherwise against the alternative
            fields = required if any(k in rec for k in required) or not alternatives else alternatives
            missing = [k for k in fields if k not in rec]
            if missing:
                want = " + ".join(required) + (f" (or {' + '.join(alternatives)})" if alternatives else "")
                raise DataError(f"{where}: missing field {missing[0]!r}; each line needs {want}")
            bad = [k for k in fields if not isinstance(rec[k], str)]
            if bad:
                raise DataError(f"{where}: field {bad[0]!r} must be a string")
            for k in fields:  # "\ud800" is valid JSON but no text: a lone surrogate cannot be tokenized
                try:
                    rec[k].encode("utf-8")
                except UnicodeEncodeError as e:
                    raise DataError(f"{where}: field {k!r} holds a lone surrogate (\\u{ord(rec[k][e.start]):04x}), "
                                    "which is not text") from None
            rec["_where"] = where
            records.append(rec)
    if not records:
        raise DataError(f"{path}: empty file (no records)")
    return records


def load_sft_jsonl(path) -> list:
    """SFT records as {"prompt", "completion", "_where"}; {"text"} records become an empty prompt."""
    recs = read_jsonl(path, ("prompt", "completion"), alternatives=("text",))
    return [r if "completion" in r else {"prompt": "", "completion": r["text"], "_where": r["_where"]} for r in recs]


def load_pref_jsonl(path) -> list:
    return read_jsonl(path, ("prompt", "chosen", "rejected"))


def encode_prompt(tok, prompt: str, block_size: int, where: str = "prompt", reserve: int = 1) -> list:
    """BOS + prompt tokens; an error (naming `where`) if fewer than `reserve` positions are left for a response."""
    ids = [tok.bos_id] + tok.encode(prompt)
    if len(ids) + reserve > block_size:
        raise DataError(f"{where}: prompt is {len(ids)} tokens, too long for the context of {block_size} tokens "
                        f"(raise --block-size or shorten the prompt)")
    return ids


def encode_response(tok, response: str, max_len: int) -> tuple:
    """Response tokens + EOS, cut to max_len. Returns (ids, truncated). A truncated response has no EOS:
    it is scored at its last token and its loss covers what is left (documented truncation)."""
    ids = tok.encode(response) + [tok.eos_id]
    return ids[:max_len], len(ids) > max_len


def encode_sft(records, tok, block_size: int) -> tuple:
    """[(prompt_ids, completion_ids)], number truncated. Sequences fit block_size + 1 tokens (inputs = seq[:-1])."""
    out, n_truncated = [], 0
    for r in records:
        p = encode_prompt(tok, r["prompt"], block_size, r.get("_where", "built-in task"))
        c, truncated = encode_response(tok, r["completion"], block_size + 1 - len(p))
        n_truncated += truncated
        out.append((p, c))
    return out, n_truncated


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A batch built on the host, on `device`: on CUDA through pinned memory without blocking the host (the copy is
    queued before the kernels that read it); elsewhere .to(device)."""
    if str(device).startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def collate_sft(batch, pad_id: int, device="cpu") -> dict:
    """Right-padded SFT batch from [(prompt_ids, completion_ids)]: idx, targets (B, T) with targets[t] = seq[t + 1];
    loss_mask (B, T) is 1 exactly where the target is a completion token or EOS (not the prompt, BOS or padding)."""
    T = max(len(p) + len(c) for p, c in batch) - 1
    idx = torch.full((len(batch), T), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(batch), T))
    for i, (p, c) in enumerate(batch):
        seq = torch.tensor(p + c)
        n = len(seq) - 1
        idx[i, :n], targets[i, :n] = seq[:-1], seq[1:]
        loss_mask[i, len(p) - 1:n] = 1.0  # target positions len(p)-1 .. n-1 hold the completion tokens
    return {"idx": to_device(idx, device), "targets": to_device(targets, device),
            "loss_mask": to_device(loss_mask, device)}


def left_pad(seqs, pad_id: int, device="cpu") -> tuple:
    """Left-padded prompts for generation/scoring: ids (B, P) long, mask (B, P) long."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, P - len(s):], mask[i, P - len(s):] = torch.tensor(s), 1
    return to_device(ids, device), to_device(mask, device)


def right_pad(seqs, pad_id: int, device="cpu") -> tuple:
    """Right-padded responses: ids (B, R) long, mask (B, R) long."""
    R = max(max(len(s) for s in seqs), 1)
    ids = torch.full((len(seqs), R), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), R), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return to_device(ids, device), to_device(mask, device)


def length_batches(lengths, batch_size: int, window: int = None, seed: int = 0) -> list:
    """Batches of indices with similar lengths, so little of each is padding: windows of `window` consecutive indices
    (None = one) are sorted by length (stable), cut into batches of batch_size, and the batches shuffled with a
    seeded RNG (a model never sees all short sequences first). Every index appears exactly once."""
    n = len(lengths)
    if n == 0:
        return []
    window = n if not window else max(window, batch_size)
    batches = []
    for w in range(0, n, window):
        idx = sorted(range(w, min(w + window, n)), key=lambda i: lengths[i])
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[i] for i in order]


def in_input_order(batches, results) -> list:
    """Per-batch results (one value per index, e.g. a list or a tensor's rows) of index batches such as
    length_batches', put back in the order of the indices: a list with one value per item."""
    out = [None] * sum(len(b) for b in batches)
    for idx, values in zip(batches, results):
        for i, v in zip(idx, values):
            out[i] = v
    return out


def padding_share(lengths, batches) -> float:
    """Padding tokens / all tokens when each batch is padded to its longest sequence (0 for no tokens)."""
    total = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    return 1.0 - sum(lengths) / total if total else 0.0
