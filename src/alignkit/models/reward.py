"""Reward-model scoring: read the scalar head at the last real token.

HF's sequence-classification pooling looks for the last token that is not the pad id, which reads the
wrong position when pad == eos (the response's EOS looks like padding). We read the head ourselves at
the last position of the attention mask, which is right for left, right and no padding alike.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from alignkit.config import DataConfig
from alignkit.data.layout import Packing, SeqBatch, layout_prompted, pad_sequences
from alignkit.data.tokenize import Encoder
from alignkit.hub import EMBEDDED_HUB_ID
from alignkit.models.default import default_model_dir
from alignkit.models.loading import best_device, load_frozen, resolve_dtype
from alignkit.ops import attention
from alignkit.ops.packing import last_hidden, resolve_packing

log = logging.getLogger("alignkit")


def _score_head(model) -> torch.nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("score", "classifier", "v_head"):
        head = getattr(inner, name, None)
        if head is not None:
            return head
    raise ValueError(f"{type(inner).__name__} has no scalar head (score/classifier)")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position whose attention mask is 1."""
    T = attention_mask.shape[-1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (pos * attention_mask.long()).argmax(-1)


def last_token_of_each(batch: SeqBatch) -> torch.Tensor:
    """(num_seqs,) flat index (row * L + column) of each packed sequence's last token."""
    R, L = batch.seq_index.shape
    flat = batch.seq_index.reshape(-1)
    where = torch.arange(R * L, device=flat.device)
    out = torch.zeros(batch.num_seqs + 1, dtype=torch.long, device=flat.device)  # bin 0: index -1
    return out.scatter_reduce(0, flat + 1, where, reduce="amax")[1:]


def reward_scores(model, batch: SeqBatch) -> torch.Tensor:
    """(B,) scalar rewards of ``model`` (a *ForSequenceClassification with num_labels=1); B = sequences,
    padded or packed (then read at each sequence's last token)."""
    _, hidden = last_hidden(model, batch)  # (B, T, H), after the final norm
    if batch.packed:
        last = hidden.reshape(-1, hidden.shape[-1])[last_token_of_each(batch)]  # (num_seqs, H)
    else:
        idx = last_token_index(batch.attention_mask)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (B, H)
    return _score_head(model)(last).squeeze(-1).float()


def reward_pad_token(tokenizer) -> int:
    """Pad id for reward models: a token other than EOS when there is one, so that HF's own pooling
    (which reads the last non-pad token) agrees with ours on models saved by alignkit."""
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer.pad_token_id
    for tok in (tokenizer.unk_token, tokenizer.bos_token):
        if tok is not None and tokenizer.convert_tokens_to_ids(tok) != tokenizer.eos_token_id:
            tokenizer.pad_token = tok
            return tokenizer.pad_token_id
    return tokenizer.pad_token_id


class RewardScorer:
    """Scores (prompt, completion) texts with a reward model saved by ``alignkit rm``.

    Works with any policy tokenizer: it takes text and uses its own tokenizer and chat template.
    """

    def __init__(self, path: str, device: Optional[str] = None, batch_size: int = 8, dtype: str = "auto",
                 chat_template: str = "auto", max_length: int = 1024):
        # deferred: transformers is slow to import; it loads when a model does
        from transformers import AutoTokenizer

        self.device = best_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model, self.precision = _load_frozen(path, dtype, self.device, self.tokenizer.pad_token_id)
        self.batch_size = batch_size
        self.encoder = Encoder(self.tokenizer, DataConfig(chat_template=chat_template, max_length=max_length))
        self.path = str(path)
        self._share: Optional[bool] = None  # decided by the layout probe at the first scoring call

    def encode_parts(self, prompt, completion: str) -> Tuple[List[int], List[int]]:
        """(prompt ids, completion ids), cut from the left to ``max_length`` tokens in all."""
        p, r = self.encoder.encode_response(prompt, completion)
        cut = max(0, len(p) + len(r) - self.encoder.max_len)
        return p[cut:], r[max(0, cut - len(p)):]

    def encode(self, prompt, completion: str) -> List[int]:
        p, r = self.encode_parts(prompt, completion)
        return p + r

    @torch.no_grad()
    def _score_chunks(self, items: list, layout: Callable[[list], SeqBatch]) -> List[float]:
        """Scores of ``items`` in chunks of ``batch_size``, each laid out by ``layout``."""
        out: List[float] = []
        with self.precision:
            for i in range(0, len(items), self.batch_size):
                out.extend(reward_scores(self.model, layout(items[i:i + self.batch_size]).to(self.device)).tolist())
        return out

    def score_ids(self, seqs: List[List[int]]) -> List[float]:
        pad = self.tokenizer.pad_token_id
        return self._score_chunks(seqs, lambda chunk: pad_sequences(chunk, [[0] * len(q) for q in chunk], pad))

    @torch.no_grad()
    def score_parts(self, parts: List[Tuple[List[int], List[int]]]) -> List[float]:
        """Scores of ``(prompt, completion)`` id pairs. Where the model passes the layout probe, each
        chunk of ``batch_size`` is laid out as a prefix tree (``layout.prompt_tree_units``: a prompt
        shared by several completions, and a beginning several prompts share, once); else padded rows."""
        if self._share is None:
            with self.precision:
                self._share = resolve_packing(self.model, True, share_prompt=True, say=log.info,
                                              switches=("reward.packing", "reward.prefix_sharing")).share_prompt
        if not self._share or any(not r for _, r in parts):
            return self.score_ids([p + r for p, r in parts])
        shared, pad = Packing(pack=True, share_prompt=True), self.tokenizer.pad_token_id
        return self._score_chunks(parts, lambda chunk: layout_prompted(
            [(p, [(r, k)]) for k, (p, r) in enumerate(chunk)], pad, shared))

    def __call__(self, prompts: List, completions: List[str]) -> List[float]:
        return self.score_parts([self.encode_parts(p, c) for p, c in zip(prompts, completions)])


def _load_frozen(path: str, dtype: str, device: torch.device, pad_token_id: Optional[int]):
    """(model, autocast context) of a reward model that only scores
    (:func:`~alignkit.models.loading.load_frozen`)."""
    def load(dt: str):
        model = load_sequence_classifier(path, resolve_dtype(dt, device), pad_token_id).to(device).eval()
        attention.use_for(model)  # a CPU model: sdpa in fp32 under autocast, as training's
        return model

    return load_frozen(load, dtype, device)


def load_sequence_classifier(path: str, dtype: torch.dtype, pad_token_id: Optional[int] = None):
    """A reward model saved by ``alignkit rm``: full weights, or a LoRA adapter (``adapter_config.json``)
    whose base is loaded with the saved ``reward_config.json`` (num_labels=1 and the tokenizer's pad id,
    so HF's pooling and ours read the same position), then merged."""
    import json

    # deferred: transformers is slow to import; it loads when a model does
    from transformers import AutoConfig, AutoModelForSequenceClassification

    p = Path(path)
    if not (p / "adapter_config.json").exists():
        return AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, use_safetensors=True)
    # deferred: peft loads only when LoRA is used
    from peft import PeftModel

    base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
    if base == EMBEDDED_HUB_ID and (default_model_dir(convert=False) / "model.safetensors").exists():
        base = str(default_model_dir(convert=False))  # the exact weights it was trained on
    kw: dict = {"num_labels": 1}
    if (p / "reward_config.json").exists():
        saved = json.loads((p / "reward_config.json").read_text())
        kw["pad_token_id"] = saved.get("pad_token_id")
    if pad_token_id is not None:
        kw["pad_token_id"] = pad_token_id
    config = AutoConfig.from_pretrained(base, **kw)
    model = AutoModelForSequenceClassification.from_pretrained(base, config=config, dtype=dtype, use_safetensors=True)
    return PeftModel.from_pretrained(model, path).merge_and_unload()


def load_reward_scorer(path: str, **options) -> Callable[[List, List[str]], List[float]]:
    if not ((Path(path) / "config.json").exists() or (Path(path) / "adapter_config.json").exists()):
        raise FileNotFoundError(f"reward model {path}: no config.json (train one with `alignkit rm`)")
    return RewardScorer(path, **options)
