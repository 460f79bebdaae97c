"""Caption generation for `RefinementCaptioner`: greedy, beam search and sampling, per layer.

`generate` runs the image encoder and the refinement once per image, then decodes every
(image, layer, candidate) in ONE batch with a KV cache:

* the prefix z_k (+ bos) of each (image, layer) is encoded once (`Readout.prefill`) and its cache
  is repeated for that group's n candidates;
* each step feeds one token per row (`Readout.step`); the loop stops as soon as every row has
  produced eos (or at max_len);
* beam search is vectorised over groups x beams (no Python loop over beams or images): each step
  takes the top n of the n x V continuations of every group; a finished beam has exactly one
  continuation (pad, log-prob 0) so it keeps its place and score; all n beams are returned,
  sorted by score, best first. The score is the summed log-prob divided by length**length_penalty
  (length_penalty = 0: plain sum, the DiCO / HF default for captioning is ~0-1).

`branch` draws the greedy caption and n − 1 greedy decodes that part from it at one word: row j ≥ 1, at the
first word of a given set it would emit (say a relation: above, below, left, right, and), emits another word of
that set instead (the j-th other one, counted from a random start per (image, layer) when a generator is given)
and goes on greedily; row 0 never parts. The rows then differ where a reward should decide (`branch_choice`).
With a separate set of words to part *to* (``branch_to``, say just "and"), a row says the j-th of those instead:
the branch group then pits what the caption states against only those alternatives.

pad and bos are never generated (their logits are masked when choosing tokens). Log-probs are
always those of the model itself (full softmax, no masking, no temperature, no top-p), summed over the
tokens after bos up to and including eos: the same quantity as
`RefinementCaptioner.sequence_logprobs`, so the two can be compared or mixed freely.

Returned tokens start with bos and are padded with pad_id after eos: [B, L, n, T] with
T <= max_len (max_len counts bos and eos, like the tokenizer's max_len). A caption that reaches
max_len without eos is returned truncated (no eos).

`naive_generate` is the plain reference: one (image, layer) at a time, no cache, the full readout
recomputed at every step. Tests and benchmarks check that the batched cached decode gives the same
tokens for greedy and beam search.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F


METHODS = ("greedy", "beam", "sample", "branch")


class GenerationOutput(NamedTuple):
    tokens: torch.Tensor  # [B, L, n, T] bos ... eos pad ..., long
    logprobs: torch.Tensor  # [B, L, n] summed model log-probs (after bos, up to and incl. eos)
    lengths: torch.Tensor  # [B, L, n] number of generated tokens (eos included)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits if logits.dtype in (torch.float32, torch.float64) else logits.float(), dim=-1)


def _choice_logits(logits: torch.Tensor, cfg) -> torch.Tensor:
    """Logits used to *choose* the next token: pad and bos are not valid outputs of a decode."""
    return logits.index_fill(-1, torch.tensor([cfg.pad_id, cfg.bos_id], device=logits.device), float("-inf"))


def _check_args(model, method: str, n: int, max_len: int | None, temperature: float, top_p: float,
                branch_ids: torch.Tensor | None = None, branch_to: torch.Tensor | None = None) -> int:
    if method not in METHODS:
        raise ValueError(f"unknown generation method {method!r}; allowed: {', '.join(METHODS)}")
    if (method == "branch") != (branch_ids is not None):
        raise ValueError("branch_ids (the token ids of the words to part at) go with method 'branch' and only with it")
    if branch_ids is not None and (branch_ids.dim() != 1 or branch_ids.numel() < 2 or branch_ids.unique().numel() != branch_ids.numel()):
        raise ValueError(f"branch_ids must be at least 2 distinct token ids, got {branch_ids.tolist()}")
    if branch_to is not None and branch_ids is None:
        raise ValueError("branch_to (the words a branch says instead) goes with branch_ids, the words it parts at")
    if branch_to is not None and (branch_to.dim() != 1 or branch_to.numel() < 1 or branch_to.unique().numel() != branch_to.numel()):
        raise ValueError(f"branch_to must be at least 1 distinct token id, got {branch_to.tolist()}")
    if n < 1 or (method == "greedy" and n != 1):
        raise ValueError(f"num_candidates must be >= 1 (exactly 1 for greedy), got {n} for {method!r}")
    max_len = model.config.max_len if max_len is None else int(max_len)
    if not 2 <= max_len <= model.config.max_len:
        raise ValueError(f"max_len must be in 2..{model.config.max_len} (the model's max_len), got {max_len}")
    if method == "sample" and (temperature <= 0 or not 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    return max_len


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token per row from softmax(logits / temperature) restricted to the top-p nucleus
    (the smallest set of most likely tokens whose mass reaches top_p). [N, V] -> [N]."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # mass before this token already reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(outside, 0.0))
    if generator is not None and generator.device != probs.device:  # e.g. a CPU generator, model on GPU
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def branch_choice(nxt: torch.Tensor, parted: torch.Tensor, slot: torch.Tensor, branch_ids: torch.Tensor,
                  branch_to: torch.Tensor | None = None):
    """One step of a branch decode. nxt [N] the tokens the rows would emit, parted [N] bool (the row has parted
    already), slot [N] the row's part: 0 never parts, j ≥ 1 takes the j-th other word; branch_ids [S] the words to
    part at. A row with slot j ≥ 1 that has not parted and would emit branch word i emits instead the (j − 1)-th
    (mod S − 1) of the other S − 1 words, in the order of ``branch_ids``, and has parted from then on.
    With ``branch_to`` [R] it emits the (j − 1)-th (mod R) of those words instead, unless that is the word it
    would emit anyway (then it goes on and may part at a later branch word). -> (tokens [N], parted [N])."""
    S = branch_ids.numel()
    hit = nxt[:, None] == branch_ids[None]  # [N, S]
    at = hit.any(-1) & ~parted & (slot > 0)
    if branch_to is not None:
        other = branch_to[(slot - 1) % branch_to.numel()]
        at = at & (other != nxt)
        return torch.where(at, other, nxt), parted | at
    i = hit.long().argmax(-1)  # the branch word the row would emit
    k = (slot - 1) % (S - 1)  # the k-th other word: index k, or k + 1 once past i
    other = branch_ids[k + (k >= i).long()]
    return torch.where(at, other, nxt), parted | at


def beam_step(logp: torch.Tensor, scores: torch.Tensor, finished: torch.Tensor, lengths: torch.Tensor,
              pad_id: int, eos_id: int, length_penalty: float, bos_id: int | None = None):
    """One vectorised beam-search step over G groups of n beams.

    logp [G, n, V] next-token log-probs; scores [G, n] summed log-probs; finished [G, n] bool;
    lengths [G, n] generated tokens so far. A finished beam's only continuation is pad (+0); an
    unfinished beam may continue with any token but pad and bos.
    Candidates are ranked by score / length**length_penalty.
    Returns (beam_idx [G, n] parent beam, tokens [G, n], scores, finished, lengths), best first.
    """
    G, n, V = logp.shape
    fin_row = torch.full((V,), float("-inf"), dtype=logp.dtype, device=logp.device)
    fin_row[pad_id] = 0.0
    banned = [pad_id] if bos_id is None else [pad_id, bos_id]
    open_logp = logp.index_fill(-1, torch.tensor(banned, device=logp.device), float("-inf"))
    cand = scores[..., None] + torch.where(finished[..., None], fin_row, open_logp)  # [G, n, V]
    cand_len = torch.where(finished, lengths, lengths + 1)  # [G, n]
    rank = cand if length_penalty == 0 else cand / cand_len[..., None].to(cand.dtype).pow(length_penalty)
    _, top = rank.view(G, n * V).topk(n, dim=-1)  # sorted, best first
    beam_idx, tokens = top // V, top % V
    scores = cand.view(G, n * V).gather(-1, top)
    lengths = cand_len.gather(-1, beam_idx)
    finished = finished.gather(-1, beam_idx) | (tokens == eos_id)
    return beam_idx, tokens, scores, finished, lengths


@torch.no_grad()
def generate(model: torch.nn.Module, pixels: torch.Tensor, z0_seed: torch.Tensor,
             layers: Sequence[int] | torch.Tensor | None = None, method: str = "greedy", num_candidates: int = 1,
             max_len: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, length_penalty: float = 0.0,
             branch_ids: torch.Tensor | None = None, branch_to: torch.Tensor | None = None) -> GenerationOutput:
    """Decode n captions per (image, layer) in one batched, KV-cached decode.

    pixels [B,3,H,W], z0_seed [B], layers: ints in 0..K (default all) ->
    GenerationOutput(tokens [B,L,n,T], logprobs [B,L,n], lengths [B,L,n]).
    method: "greedy" (n = 1), "beam" (n beams, all returned best first) or "sample" (n independent
    samples, temperature / top_p; pass a torch.Generator for reproducibility: draws happen on the
    generator's device), or "branch" (the greedy caption, then n − 1 greedy decodes, each parting at the first of
    ``branch_ids`` it would emit to a different other word of them, from a random start drawn from ``generator``
    if given: `branch_choice`; with ``branch_to``, to one of those words instead). length_penalty only affects beam ranking
    (score / length**length_penalty).
    The model runs in eval mode (dropout off) for the call and is put back in its previous mode.
    """
    n = int(num_candidates)
    max_len = _check_args(model, method, n, max_len, temperature, top_p, branch_ids, branch_to)
    cfg, readout = model.config, model.readout
    was_training = model.training
    model.eval()
    try:
        Z = model.latents(pixels, z0_seed)  # once per image
        idx = model._layers(layers).to(Z.device)
        B, L = Z.shape[0], idx.numel()
        G = B * L
        prefix = Z.index_select(1, idx).flatten(0, 1)  # [G, M, d]
        bos = torch.full((G, 1), cfg.bos_id, dtype=torch.long, device=Z.device)
        logits, cache = readout.prefill(prefix, bos, capacity=max_len)  # prefix encoded once per (image, layer)
        cache.repeat(n)  # ... and shared by that group's n candidates
        logits = logits.repeat_interleave(n, dim=0)  # [G*n, V]
        if method == "beam":
            tokens, logprobs, lengths = _beam_search(readout, logits, cache, G, n, max_len, cfg, length_penalty)
        else:
            tokens, logprobs, lengths = _greedy_or_sample(readout, logits, cache, method, max_len, cfg,
                                                          temperature, top_p, generator, n, branch_ids, branch_to)
    finally:
        model.train(was_training)
    T = tokens.shape[-1]
    return GenerationOutput(tokens.view(B, L, n, T), logprobs.view(B, L, n), lengths.view(B, L, n))


def _greedy_or_sample(readout, logits, cache, method, max_len, cfg, temperature, top_p, generator, n=1, branch_ids=None,
                      branch_to=None):
    N, device = logits.shape[0], logits.device
    if branch_ids is not None:
        branch_ids = branch_ids.to(device)
        branch_to = None if branch_to is None else branch_to.to(device)
        others = branch_ids.numel() - 1 if branch_to is None else branch_to.numel()  # the words a row may part to
        slot = torch.arange(N, device=device) % n  # row 0 of each (image, layer) is the greedy caption
        if generator is not None:  # each (image, layer) starts at a random other word, so that n − 1 < S − 1 rows see all
            turn = torch.randint(0, others, (N // n,), generator=generator, device=generator.device)
            slot = torch.where(slot > 0, slot + turn.to(device).repeat_interleave(n), slot)
        parted = torch.zeros(N, dtype=torch.bool, device=device)
    tokens = [torch.full((N,), cfg.bos_id, dtype=torch.long, device=device)]
    logp_sum = torch.zeros(N, dtype=_log_softmax(logits[:1]).dtype, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    for t in range(1, max_len):
        logp = _log_softmax(logits)
        choice = _choice_logits(logits, cfg)
        nxt = sample_next(choice, temperature, top_p, generator) if method == "sample" else choice.argmax(-1)
        if branch_ids is not None:
            nxt, parted = branch_choice(nxt, parted, slot, branch_ids, branch_to)
        nxt = nxt.masked_fill(finished, cfg.pad_id)
        logp_sum += logp.gather(-1, nxt[:, None]).squeeze(-1).masked_fill(finished, 0.0)
        lengths += (~finished).long()
        finished |= nxt == cfg.eos_id
        tokens.append(nxt)
        if t == max_len - 1 or bool(finished.all()):
            break
        logits = readout.step(nxt, t, cache)
    return torch.stack(tokens, dim=-1), logp_sum, lengths


def _beam_search(readout, logits, cache, G, n, max_len, cfg, length_penalty):
    device = logits.device
    scores = torch.zeros(G, n, dtype=_log_softmax(logits[:1]).dtype, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first at step 1
    finished = torch.zeros(G, n, dtype=torch.bool, device=device)
    lengths = torch.zeros(G, n, dtype=torch.long, device=device)
    seqs = torch.full((G, n, 1), cfg.bos_id, dtype=torch.long, device=device)
    offsets = torch.arange(G, device=device)[:, None] * n
    for t in range(1, max_len):
        logp = _log_softmax(logits).view(G, n, -1)
        beam_idx, tok, scores, finished, lengths = beam_step(logp, scores, finished, lengths, cfg.pad_id,
                                                             cfg.eos_id, length_penalty, cfg.bos_id)
        seqs = torch.cat([seqs.gather(1, beam_idx[..., None].expand(-1, -1, seqs.shape[-1])), tok[..., None]], dim=-1)
        if t == max_len - 1 or bool(finished.all()):
            break
        cache.reorder((beam_idx + offsets).view(-1))
        logits = readout.step(tok.view(-1), t, cache)
    seqs, scores, lengths = _sort_beams(seqs, scores, lengths, length_penalty)
    return seqs.view(G * n, -1), scores.view(-1), lengths.view(-1)


def _sort_beams(seqs, scores, lengths, length_penalty):
    rank = scores if length_penalty == 0 else scores / lengths.clamp(min=1).to(scores.dtype).pow(length_penalty)
    order = rank.sort(dim=-1, descending=True, stable=True).indices
    return seqs.gather(1, order[..., None].expand_as(seqs)), scores.gather(1, order), lengths.gather(1, order)


# ----------------------------------------------------------------------------------- reference
@torch.no_grad()
def naive_generate(model: torch.nn.Module, pixels: torch.Tensor, z0_seed: torch.Tensor,
                   layers: Sequence[int] | torch.Tensor | None = None, method: str = "greedy",
                   num_candidates: int = 1, max_len: int | None = None, length_penalty: float = 0.0) -> GenerationOutput:
    """Reference decode (greedy or beam): one (image, layer) at a time, no KV cache, the full readout
    recomputed over the whole prefix + text at every step. Slow; for tests and benchmarks."""
    n = int(num_candidates)
    if method not in ("greedy", "beam"):
        raise ValueError(f"naive_generate supports greedy and beam, got {method!r}")
    max_len = _check_args(model, method, n, max_len, 1.0, 1.0)
    cfg = model.config
    was_training = model.training
    model.eval()
    try:
        Z = model.latents(pixels, z0_seed)
        idx = model._layers(layers).tolist()
        results = [[_naive_one(model, Z[b, k], method, n, max_len, length_penalty) for k in idx] for b in range(Z.shape[0])]
    finally:
        model.train(was_training)
    T = max(r[0].shape[-1] for row in results for r in row)
    tokens = torch.stack([torch.stack([F.pad(r[0], (0, T - r[0].shape[-1]), value=cfg.pad_id) for r in row]) for row in results])
    logprobs = torch.stack([torch.stack([r[1] for r in row]) for row in results])
    lengths = torch.stack([torch.stack([r[2] for r in row]) for row in results])
    return GenerationOutput(tokens, logprobs, lengths)


def _naive_one(model, z, method, n, max_len, length_penalty):
    """z [M, d] -> (tokens [n, T], logprobs [n], lengths [n]) for one (image, layer)."""
    cfg, device = model.config, z.device
    seqs = torch.full((n, 1), cfg.bos_id, dtype=torch.long, device=device)
    scores = torch.zeros(1, n, dtype=z.dtype, device=device)
    scores[:, 1:] = float("-inf")
    finished = torch.zeros(1, n, dtype=torch.bool, device=device)
    lengths = torch.zeros(1, n, dtype=torch.long, device=device)
    for t in range(1, max_len):
        logits = model.readout(z[None].expand(n, -1, -1), seqs)[:, -1]  # full recompute, last position
        logp = _log_softmax(logits)
        if method == "greedy":
            nxt = _choice_logits(logits, cfg).argmax(-1).masked_fill(finished[0], cfg.pad_id)
            scores = scores + logp.gather(-1, nxt[:, None]).squeeze(-1).masked_fill(finished[0], 0.0)[None]
            lengths = lengths + (~finished).long()
            finished = finished | (nxt == cfg.eos_id)[None]
            seqs = torch.cat([seqs, nxt[:, None]], dim=-1)
        else:
            beam_idx, tok, scores, finished, lengths = beam_step(logp[None], scores, finished, lengths, cfg.pad_id,
                                                                 cfg.eos_id, length_penalty, cfg.bos_id)
            seqs = torch.cat([seqs[beam_idx[0]], tok[0][:, None]], dim=-1)
        if bool(finished.all()):
            break
    if method == "beam":
        s, scores, lengths = _sort_beams(seqs[None], scores, lengths, length_penalty)
        seqs = s[0]
    return seqs, scores[0], lengths[0]


def concat_candidates(a: GenerationOutput, b: GenerationOutput, pad_id: int) -> GenerationOutput:
    """Two generations of the same images and layers side by side on the candidate axis ([B, L, n_a + n_b, T]),
    the shorter token tensor padded with ``pad_id``."""
    T = max(a.tokens.shape[-1], b.tokens.shape[-1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, T - t.shape[-1]), value=pad_id)

    return GenerationOutput(torch.cat([pad(a.tokens), pad(b.tokens)], dim=2), torch.cat([a.logprobs, b.logprobs], dim=2),
                            torch.cat([a.lengths, b.lengths], dim=2))
