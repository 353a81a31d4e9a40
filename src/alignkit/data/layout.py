"""How sequences become rows: padded rows, packed rows without padding between sequences, and
prefix-shared rows in which a prompt (and a beginning several prompts share) runs once.

Padded (the plain layout): one sequence per row, right padding; masks come from lengths, not pad ids.

Packed (``Packing(pack=True)``): several sequences per row, each with position ids restarting at 0,
rows filled first-fit-decreasing; the row length is the cheapest of a few candidates between the
longest sequence and ``ROW_TOKENS`` (padding removed against longer attention: ``_choose_rows``). The
model must not attend across sequences: ``ops/packing.py`` turns the layout into the model's inputs
(transformers' packed-sequence path, a block mask, or segment attention).
With ``share_prompt`` a pair is one unit ``[prompt][chosen][rejected]``: both responses sit at the
positions they would have after the prompt, each attends to the prompt and to itself only, and the
first token of the rejected response is predicted from the prompt's last hidden state
(``label_from``), so the prompt runs once per pair (Wang et al. 2024, "Accelerating Direct Preference
Optimization with Prefix Sharing"). The prompts of a batch form prefix trees
(:func:`prompt_tree_units`), so a beginning several prompts share runs once too.

The per-task collators that build these from dataset items are in ``data/collate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class SeqBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    loss_mask: torch.Tensor  # (B, T) 1 on tokens that are labels (response tokens, EOS included)
    # packed layouts only (None in a padded batch): R rows of L tokens holding ``num_seqs`` sequences
    position_ids: Optional[torch.Tensor] = None  # (R, L) restart at 0 per sequence (a shared prompt's responses continue it)
    seq_index: Optional[torch.Tensor] = None  # (R, L) long, the sequence a token belongs to; -1: padding, shared prompt
    label_from: Optional[torch.Tensor] = None  # (R, L) long, the position whose hidden state predicts this token
    # prefix-shared layouts only: blocks are numbered in depth-first order of each unit's segment tree, so a
    # block's descendants are the blocks right after it; a token attends (causally) to the blocks whose
    # range [block, block_end) holds its own block: its own and its ancestors' (its shared prompt parts)
    block: Optional[torch.Tensor] = None  # (R, L) long, the token's attention block
    block_end: Optional[torch.Tensor] = None  # (R, L) long, one past the last block of its block's subtree
    num_seqs: int = 0

    def to(self, device) -> "SeqBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if torch.is_tensor(getattr(self, f.name))})

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def shared(self) -> bool:
        """Prefix-shared layout: needs a block mask (some tokens see another block)."""
        return self.block_end is not None

    @property
    def num_label_tokens(self) -> int:
        return int(self.loss_mask[:, 1:].sum())

    def __len__(self) -> int:
        return self.num_seqs if self.packed else self.input_ids.shape[0]


@dataclass(frozen=True)
class Packing:
    """How a task lays out its micro-batches (decided per run by ``ops.packing.resolve_packing``)."""

    pack: bool = False
    """Padding-free packing: several sequences per row, attention kept within each."""
    share_prompt: bool = False
    """Pairs as [prompt][chosen][rejected] (implies pack)."""
    max_tokens: Optional[int] = None
    """Micro-batches by a token budget instead of a row count (``train.max_tokens_per_batch``)."""


PADDED = Packing()

# a segment of a packing unit: (ids, loss mask, sequence index or -1, parent segment index or None); the
# segments of a unit form a forest listed in depth-first order (a parent before its subtree, each subtree
# contiguous)
_Segment = Tuple[List[int], List[int], int, Optional[int]]


#: packed rows hold at most this many tokens (or the longest unit, when longer)
ROW_TOKENS = 1024
#: row length at which a layer's attention (a masked L x L on CPU) costs about as much as its matmuls
#: (2 d + 1.5 d_ffn for a 0.1-1B model); it prices long rows when choosing the layout
ATTENTION_TOKENS = 4096


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Unit indices per row, each row at most ``capacity`` tokens (or the longest unit), filled
    first-fit in decreasing length order."""
    cap = max(max(lengths), capacity)
    rows: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(cap - lengths[i])
    for r in rows:
        r.sort()  # keep the data order within a row (deterministic, easy to read)
    return rows


def _choose_rows(lengths: Sequence[int], row_tokens: int = ROW_TOKENS) -> List[List[int]]:
    """The cheapest of a few row capacities (the longest unit, 1.5x, 2x, ``row_tokens``): cost = rows x
    row length x (1 + row length / ATTENTION_TOKENS). The longest unit's capacity is a candidate, so
    the layout never costs more than the padded batch; longer rows pay off when they remove padding."""
    longest = max(lengths)
    top = max(longest, row_tokens)
    best, best_cost = [], float("inf")
    for cap in sorted({longest, min(top, longest * 3 // 2), min(top, 2 * longest), top}):
        rows = _first_fit_decreasing(lengths, cap)
        L = max(sum(lengths[i] for i in r) for r in rows)
        cost = len(rows) * L * (1 + L / ATTENTION_TOKENS)
        if cost < best_cost:
            best, best_cost = rows, cost
    return best


def pack_units(units: Sequence[Sequence[_Segment]], pad_id: int, num_seqs: int,
               row_tokens: int = ROW_TOKENS) -> SeqBatch:
    """Lay out units (lists of segments kept together in one row) into packed rows.

    A segment without a parent is a sequence of its own: positions from 0, attention within itself,
    its first token is not a label (nothing precedes it, as in a padded row). A segment with a parent
    (a response after its shared prompt, or the rest of a prompt after a prefix it shares with other
    prompts) continues the positions of the path from its root, attends to that path too, and its first
    token is predicted from the parent's last token. A unit's segments must be in depth-first order.
    """
    lengths = [sum(len(seg[0]) for seg in u) for u in units]
    rows = _choose_rows(lengths, row_tokens)
    R, L = len(rows), max(sum(lengths[i] for i in r) for r in rows)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    attn = torch.zeros((R, L), dtype=torch.long)
    loss = torch.zeros((R, L), dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    seq = torch.full((R, L), -1, dtype=torch.long)
    src = (torch.arange(L) - 1).clamp(min=0).repeat(R, 1)
    block = torch.zeros((R, L), dtype=torch.long)
    block_end = torch.zeros((R, L), dtype=torch.long)
    shared = False
    nb = 0
    for r, members in enumerate(rows):
        off = 0
        for u in members:
            segs = units[u]
            # (offset, length, first position after it) of each segment; its block is nb + its index
            starts: List[Tuple[int, int, int]] = []
            ends = list(range(1, len(segs) + 1))  # one past the last segment of each segment's subtree
            for k, (seg_ids, seg_mask, s_idx, parent) in enumerate(segs):
                n = len(seg_ids)
                sl = slice(off, off + n)
                ids[r, sl] = torch.tensor(seg_ids, dtype=torch.long)
                attn[r, sl] = 1
                loss[r, sl] = torch.tensor(seg_mask, dtype=torch.long)
                seq[r, sl] = s_idx
                block[r, sl] = nb + k
                if parent is None:
                    pos[r, sl] = torch.arange(n)
                    loss[r, off] = 0  # the first token of a sequence is never a label
                    p0 = 0
                else:
                    if not 0 <= parent < k or ends[parent] != k:  # segments parent+1..k-1: its subtree
                        raise ValueError(f"unit {u}: segment {k}'s parent {parent} is not an earlier segment "
                                         "of a depth-first order")
                    p_off, p_len, p0 = starts[parent]
                    src[r, off] = p_off + p_len - 1  # the parent's last token predicts the segment's first
                    shared = True
                    q = parent
                    while q is not None:  # every ancestor's subtree reaches this segment
                        ends[q] = max(ends[q], k + 1)
                        q = segs[q][3]
                pos[r, sl] = torch.arange(p0, p0 + n)
                starts.append((off, n, p0 + n))
                off += n
            for (o, n, _), e in zip(starts, ends):  # the subtrees are complete once the unit is laid out
                block_end[r, o:o + n] = nb + e
            nb += len(segs)
        if off < L:  # the row's padding: one more block, positions from 0, never a label
            pos[r, off:] = torch.arange(L - off)
            block[r, off:] = nb
            block_end[r, off:] = nb + 1
            nb += 1
    return SeqBatch(ids, attn, loss, pos, seq, src, block if shared else None, block_end if shared else None,
                    num_seqs)


def _cost(tokens: int) -> float:
    """The price of a unit of ``tokens`` tokens in one row: its tokens, and its attention (a masked L x L)."""
    return tokens * (1 + tokens / ATTENTION_TOKENS)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def prompt_tree_units(groups: Sequence[Tuple[Sequence[int], Sequence[Tuple[List[int], List[int], int]]]]
                      ) -> List[List[_Segment]]:
    """Packing units in which each prompt runs once, and so does each prefix that prompts share.

    ``groups``: ``(prompt, [(response ids, response loss mask, sequence index), ...])``. Groups with the
    same prompt are merged, and prompts with a common beginning (a chat template's system prompt, a
    few-shot preamble) join one unit: a prefix tree whose shared parts are segments of their own, each
    prompt's rest below them, its responses below that. In exact arithmetic every token gets the
    numbers it has in its own row (a causal model's token depends only on the tokens before it).
    Prompts, sorted, join the unit before them while that lowers :func:`_cost`: sharing ``c`` tokens
    saves ``c`` tokens but lengthens the unit's attention, so long units stop growing. A group without a
    prompt, and a prompt with one response and nothing to share, stay plain sequences.
    """
    by_prompt: Dict[Tuple[int, ...], List[Tuple[List[int], List[int], int]]] = {}
    units: List[List[_Segment]] = []
    for p, rs in groups:
        if p:
            by_prompt.setdefault(tuple(p), []).extend(rs)
        else:
            units.extend([[(list(r), list(m), i, None)] for r, m, i in rs])
    size = {p: len(p) + sum(len(r) for r, _, _ in rs) for p, rs in by_prompt.items()}
    chunks: List[List[Tuple[int, ...]]] = []
    tokens = 0
    for p in sorted(by_prompt):
        c = _common(chunks[-1][-1], p) if chunks else 0
        if c and _cost(tokens + size[p] - c) < _cost(tokens) + _cost(size[p]):
            chunks[-1].append(p)
            tokens += size[p] - c
        else:
            chunks.append([p])
            tokens = size[p]

    def tree(ps: List[Tuple[int, ...]], depth: int, parent: Optional[int], out: List[_Segment]) -> None:
        # ps: sorted prompts that agree on their first ``depth`` tokens; emit their common next part, the
        # responses of the prompts that end there, then one subtree per next token
        c = _common(ps[0], ps[-1])  # sorted: what the first and the last share, all share
        out.append((list(ps[0][depth:c]), [0] * (c - depth), -1, parent))
        here = len(out) - 1
        rest = []
        for p in ps:
            if len(p) == c:
                out.extend((list(r), list(m), i, here) for r, m, i in by_prompt[p])
            else:
                rest.append(p)
        k = 0
        while k < len(rest):
            j = k
            while j < len(rest) and rest[j][c] == rest[k][c]:
                j += 1
            tree(rest[k:j], c, here, out)
            k = j

    for chunk in chunks:
        if len(chunk) == 1 and len(by_prompt[chunk[0]]) == 1:
            (r, m, i), = by_prompt[chunk[0]]
            p = list(chunk[0])
            units.append([(p + list(r), [0] * len(p) + list(m), i, None)])
        else:
            unit: List[_Segment] = []
            tree(chunk, 0, None, unit)
            units.append(unit)
    return units


def layout_sequences(seqs: Sequence[List[int]], masks: Sequence[List[int]], pad_id: int,
                     packing: Packing = PADDED) -> SeqBatch:
    """Sequences ``i = 0..n-1``, padded or packed."""
    if not packing.pack:
        return pad_sequences(seqs, masks, pad_id)
    return pack_units([[(list(s), list(m), i, None)] for i, (s, m) in enumerate(zip(seqs, masks))], pad_id,
                      len(seqs))


def pad_sequences(seqs: Sequence[List[int]], masks: Sequence[List[int]], pad_id: int,
                  pad_to_multiple_of: int = 1) -> SeqBatch:
    T = max(len(s) for s in seqs)
    T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    loss = torch.zeros((B, T), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        loss[i, : len(m)] = torch.tensor(m, dtype=torch.long)
    return SeqBatch(ids, attn, loss)


def prompt_response(p: List[int], r: List[int]):
    return p + r, [0] * len(p) + [1] * len(r)


def layout_prompted(groups: Sequence[Tuple[List[int], Sequence[Tuple[List[int], int]]]], pad_id: int,
                    packing: Packing = PADDED) -> SeqBatch:
    """Sequences ``prompt + response`` from ``groups`` of ``(prompt, [(response, sequence index), ...])``
    (indices 0..n-1, each once): padded rows, packed rows, or (``share_prompt``) one
    ``[prompt][response 1][response 2]...`` unit per group, each response seeing the prompt and itself."""
    n = sum(len(rs) for _, rs in groups)
    if not packing.share_prompt:
        seqs: List[List[int]] = [[] for _ in range(n)]
        masks: List[List[int]] = [[] for _ in range(n)]
        for p, rs in groups:
            for r, i in rs:
                seqs[i], masks[i] = prompt_response(list(p), list(r))
        return layout_sequences(seqs, masks, pad_id, packing)
    return pack_units(prompt_tree_units([(p, [(list(r), [1] * len(r), i) for r, i in rs]) for p, rs in groups]),
                      pad_id, n)


@dataclass
class SharedRows:
    """A right-padded batch of ``prompt + response`` rows laid out with each prompt once
    (:func:`share_row_prompts`), and where each packed label goes back to in the rows' ``(B, T-1)`` label
    space: packed label ``src[k]`` (flat over ``(R, L-1)``) is label ``(row[k], col[k])``."""

    batch: SeqBatch
    src: torch.Tensor  # (K,) long
    row: torch.Tensor  # (K,) long
    col: torch.Tensor  # (K,) long
    shape: Tuple[int, int]  # (B, T-1) of the rows

    def to(self, device) -> "SharedRows":
        return SharedRows(self.batch.to(device), self.src.to(device), self.row.to(device), self.col.to(device),
                          self.shape)

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(R, L-1) per-label values of the packed batch -> (B, T-1) in the rows' label space, 0 elsewhere
        (differentiable; no host sync)."""
        out = x.new_zeros(self.shape)
        return out.index_put((self.row, self.col), x.reshape(-1).index_select(0, self.src))


def share_row_prompts(seq: SeqBatch, pad_id: int) -> Optional[SharedRows]:
    """The prefix-shared layout of a right-padded batch whose rows are ``prompt + response`` (online RL:
    a group's samples of one prompt; PPO's rows of different prompts). The rows' prompts form prefix trees
    (:func:`prompt_tree_units`): rows with the same prompt become one ``[prompt][response 1]...`` unit,
    each response seeing the prompt and itself, and prompts with a common beginning share it too. A row's
    prompt is its tokens before its first label (``loss_mask``); sequence ``i`` is row ``i`` and its
    labels keep their mask. A row that shares nothing stays a sequence of its own. None when no row
    shares anything (nothing to gain: use the rows as they are). Runs on the host."""
    seq = seq.to("cpu")
    mask = seq.loss_mask.bool()
    ids, lm = seq.input_ids.tolist(), seq.loss_mask.tolist()
    groups = []
    for i in range(seq.input_ids.shape[0]):
        n = int(seq.attention_mask[i].sum())
        labels = mask[i, :n].nonzero()
        p = int(labels[0]) if len(labels) else n
        groups.append((ids[i][:p], [(ids[i][p:n], lm[i][p:n], i)]))
    units = prompt_tree_units(groups)
    if all(len(u) == 1 for u in units):
        return None
    packed = pack_units(units, pad_id, seq.input_ids.shape[0])
    labels = packed.loss_mask[:, 1:].bool()
    src = labels.reshape(-1).nonzero().squeeze(1)
    # label t of a sequence predicts the token at position t + 1; in the sequence's own row (prompt at
    # column 0) that token sits at column = its position id
    row, col = packed.seq_index[:, 1:][labels], packed.position_ids[:, 1:][labels] - 1
    return SharedRows(packed, src, row, col, (seq.input_ids.shape[0], seq.input_ids.shape[1] - 1))


def layout_pairs(prompts: Sequence[List[int]], chosen: Sequence[List[int]], rejected: Sequence[List[int]],
                 pad_id: int, packing: Packing = PADDED) -> SeqBatch:
    """``prompt + chosen`` as sequences 0..B-1 and ``prompt + rejected`` as B..2B-1."""
    B = len(prompts)
    return layout_prompted([(p, [(c, i), (r, B + i)]) for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected))],
                           pad_id, packing)
