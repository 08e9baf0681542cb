"""PairRM: a DeBERTa-v2/v3 encoder that reads (source, candidate A, candidate B) as one sequence,
plus a small head over the hidden states of the three prefix tokens.

f(x, A, B) = g([h_src; h_A]) - g([h_src; h_B]) with g(u) = W2 tanh(W1 u + b1) + b2.
Parameter names match both published checkpoint layouts (`pretrained_model.*`, `head_layer.*`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DebertaV2Config, DebertaV2Model

ATTENTION_KERNELS = ("sdpa", "flashdeberta")


class PairRMModel(nn.Module):
    """Encoder + pair head. `forward` returns one single-order logit f(x, A, B) per row.

    `attention_kernel` (inference only): "sdpa" (ours, any device) or "flashdeberta" (the `flashdeberta` package's
    Triton kernel, CUDA only, opt-in: `pip install flashdeberta`; see docs/BENCHMARKS.md).
    """

    attention_kernel: str = "sdpa"
    # False: the fast encoder as issue 24 found it (the skewed position route at every length and dtype), for
    # `pairrm-rlhf bench`'s side-by-side rows only; not an option of the library.
    _levers: bool = True

    def __init__(self, config: DebertaV2Config, n_tasks: int = 1, dropout: float = 0.05):
        super().__init__()
        self.config = config
        self.pretrained_model = DebertaV2Model(config)
        hidden = config.hidden_size
        self.head_layer = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(2 * hidden, hidden),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_tasks),
        )

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states [B, L, H], keeping no other layer's output.

        Inference uses our own disentangled attention (`fast_encoder`) when the configuration is DeBERTa-v3's;
        training, and any other configuration, use the stock transformers encoder.
        """
        encoder = self.pretrained_model
        embeddings = encoder.embeddings(input_ids=input_ids, mask=attention_mask)
        if not self.training and supports_fast_encoder(self.config):
            mask = attention_mask.bool()
            return fast_encoder(encoder.encoder, embeddings, mask, self.attention_kernel, _levers=self._levers)
        return encoder.encoder(embeddings, attention_mask, output_hidden_states=False).last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix_positions: torch.Tensor,
    ) -> torch.Tensor:
        """`prefix_positions` is [batch, 3]: where `<|source|>`, `<|candidate1|>`, `<|candidate2|>` stand.

        Positions are passed explicitly (the tokenizer knows them) rather than searched for by token id,
        so user text can never move them.
        """
        return self.head(select(self.encode(input_ids, attention_mask), prefix_positions))

    def head(self, prefix_states: torch.Tensor) -> torch.Tensor:
        """g([h_src; h_A]) - g([h_src; h_B]) per row, as float32, from the [B, 3, H] prefix-token states."""
        src, cand1, cand2 = prefix_states.unbind(1)
        left = self.head_layer(torch.cat([src, cand1], dim=-1))
        right = self.head_layer(torch.cat([src, cand2], dim=-1))
        return (left - right)[:, 0].float()


def select(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden[b, positions[b, p]] -> [B, P, H]."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device)[:, None], positions]


# ---- inference-only encoder ---------------------------------------------------------------------
# The same computation as transformers' DeBERTa-v2 encoder, written for speed: no per-batch copies of the
# relative-position projections, no [B, L, L] mask, content and position terms summed into one additive
# bias, and softmax(QK^T/s + bias)V done by `scaled_dot_product_attention`.


def supports_fast_encoder(config: DebertaV2Config) -> bool:
    """DeBERTa-v3 style: relative attention with a p2c (and usually c2p) term, log buckets, no conv layer."""
    pos_att_type = set(config.pos_att_type or [])
    return (
        getattr(config, "relative_attention", False)
        and "p2c" in pos_att_type
        and pos_att_type <= {"c2p", "p2c"}
        and getattr(config, "position_buckets", -1) > 0
        and getattr(config, "conv_kernel_size", 0) == 0
        and getattr(config, "attention_head_size", config.hidden_size // config.num_attention_heads)
        == config.hidden_size // config.num_attention_heads
    )


def log_buckets(rel: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """Relative positions bucketed as DeBERTa-v3 does: exact within +-buckets/2, log-spaced beyond.

    Computed in float32 as transformers' `make_log_bucket_position` does (and as PairRM was trained): where
    float32 and float64 round the log to different sides of an integer, the bucket differs (e.g. 256 buckets,
    max_position 256: distance 1292). With DeBERTa-v3's 256 buckets and 512 positions they agree to 8191.
    """
    mid = buckets // 2
    far = rel.abs().clamp(min=mid).float()  # values inside the exact window are replaced below
    log_pos = torch.ceil(torch.log(far / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    return torch.where(rel.abs() <= mid, rel, log_pos.long() * rel.sign())


def attention_scale(head_size: int, terms: int) -> float:
    """sqrt(head_size * terms) rounded to float32, the constant transformers divides the scores by (in every
    dtype but half precision, where it rounds it further to the half type; we keep the float32 value).

    The rounding is part of the model: sqrt(192) in float32 is 1.8e-8 below the exact value, which an encoder
    of 6 layers at init range 0.2 amplifies to 1e-5 in float64 hidden states.
    """
    return float(torch.sqrt(torch.tensor(head_size, dtype=torch.float32) * terms))


_POSITION_CACHE: dict[tuple, torch.Tensor] = {}


def relative_rows(length: int, span: int, max_position: int, device: torch.device) -> torch.Tensor:
    """Rows of the 2*span relative embeddings for relative positions i - j = L-1 ... -(L-1), in that order."""
    key = ("rows", length, span, max_position, str(device))
    if key not in _POSITION_CACHE:
        if len(_POSITION_CACHE) > 64:
            _POSITION_CACHE.clear()
        buckets = log_buckets(torch.arange(-(length - 1), length, device=device), span, max_position)
        _POSITION_CACHE[key] = (span + buckets.flip(0)).clamp(0, 2 * span - 1)
    return _POSITION_CACHE[key]


def bucket_index(length: int, span: int, max_position: int, device: torch.device) -> torch.Tensor:
    """[L, L] row of the 2*span relative embeddings for each (i, j): span + bucket(i - j), as transformers gathers."""
    key = ("index", length, span, max_position, str(device))
    if key not in _POSITION_CACHE:
        if len(_POSITION_CACHE) > 64:
            _POSITION_CACHE.clear()
        position = torch.arange(length, device=device)
        buckets = log_buckets(position[:, None] - position[None, :], span, max_position)
        _POSITION_CACHE[key] = (span + buckets).clamp(0, 2 * span - 1)
    return _POSITION_CACHE[key]


def skew(scores: torch.Tensor) -> torch.Tensor:
    """[..., L, 2L-1] scores over relative positions -(L-1)..L-1 -> [..., L, L] with out[i, j] at r = j - i.

    A strided view (Transformer-XL's relative shift): row i starts at column L-1-i, so no gather is needed.
    """
    *lead, length, width = scores.shape
    scores = scores.contiguous()
    stride = list(scores.stride())
    return scores.as_strided(
        (*lead, length, length), (*stride[:-2], width - 1, 1), scores.storage_offset() + length - 1
    )


def fast_encoder(
    encoder: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, kernel: str = "sdpa", *, _levers: bool = True
) -> torch.Tensor:
    """Run a DeBERTa-v2 encoder's layers on embeddings `hidden` [B, L, H] with key padding `mask` [B, L].

    The relative-position terms take the cheaper of two exact routes (measured in docs/BENCHMARKS.md): up to
    2L-1 <= 2*span relative distances (in half precision up to L <= 2*span), one GEMM per term against every
    distance, skewed into [L, L] by a strided view; beyond, one GEMM per term against the 2*span buckets (a third
    of the work at L = 683), gathered into [L, L] by the bucket index. Off the CPU, where none of this was measured,
    half precision keeps the skewed route and the gathers are not split into blocks (the rules as measured in the
    first round). `_levers=False` (bench only): the skewed route at every length, as issue 24 found the engine.
    """
    if kernel != "sdpa":
        return _flashdeberta_encoder(encoder, hidden, mask, kernel)
    length = hidden.shape[1]
    span, max_position = encoder.position_buckets, encoder.max_relative_positions
    # In half precision the GEMMs are cheaper, so the gathers pay off later (measured, 2 layers, bfloat16 autocast:
    # skewed 1.09 vs bucketed 1.31 CPU-s at 8 x 300 tokens, 1.79 vs 1.70 at 4 x 683, 7.64 vs 5.51 at 3 x 2000).
    half_precision = torch.is_autocast_enabled(hidden.device.type) or hidden.dtype in (torch.bfloat16, torch.float16)
    cpu = hidden.device.type == "cpu"
    if length <= (span if not half_precision else 2 * span if cpu else length) or not _levers:
        positions = _SkewedPositions(relative_rows(length, span, max_position, hidden.device), mask)
        rel_embeddings = encoder.get_rel_embedding()[positions.rows]
    else:
        index = bucket_index(length, span, max_position, hidden.device)
        positions = _BucketedPositions(index, mask, None if cpu else length)
        rel_embeddings = encoder.get_rel_embedding()
    for layer in encoder.layer:
        attention = layer.attention
        context = _disentangled_attention(attention.self, hidden, rel_embeddings, positions)
        attended = attention.output(context, hidden)
        hidden = layer.output(layer.intermediate(attended), attended)
    return hidden


class _SkewedPositions:
    """c2p/p2c against every relative distance i - j = L-1 ... -(L-1) ([H, B*L, 2L-1], one GEMM per head), made
    [B, H, L, L] by `skew`. Padding keys are masked by filling their p2c rows (row j of p2c's [j, i] scores is
    key j)."""

    def __init__(self, rows: torch.Tensor, mask: torch.Tensor):
        self.rows = rows
        self.padding = (~mask).reshape(-1).nonzero().squeeze(1)  # flat [B*L] indices of padding tokens

    def bias(self, query, key, pos_query, pos_key, scale: float) -> torch.Tensor:
        batch, heads, length, _ = query.shape

        def per_head(x: torch.Tensor) -> torch.Tensor:  # [B, H, L, d] -> [H, B*L, d]: one GEMM per head
            return x.transpose(0, 1).flatten(1, 2)

        def unskew(x: torch.Tensor) -> torch.Tensor:  # [H, B*L, 2L-1] -> [B, H, L, L] (a view)
            return skew(x.unflatten(1, (batch, length))).transpose(0, 1)

        # Skewed column m of row a stands for b - a = m - (L-1). For c2p (a=i, b=j) that is -(i - j): the order of
        # the rows. p2c is computed as [j, i] (a=j, b=i, +(i - j): the reversed rows), then transposed.
        p2c = torch.matmul(per_head(key), pos_query.flip(-2).transpose(-1, -2) / scale)
        p2c.index_fill_(1, self.padding, torch.finfo(p2c.dtype).min)
        bias = unskew(p2c).transpose(-1, -2)
        if pos_key is None:
            return bias
        return unskew(torch.matmul(per_head(query), pos_key.transpose(-1, -2) / scale)) + bias


class _BucketedPositions:
    """c2p/p2c against the 2*span position buckets, gathered into [B, H, L, L] by the bucket index:
    c2p[i, j] = q_i . k_pos[index[i, j]] (from [B, H, L, 2*span]) and p2c[i, j] = k_j . q_pos[index[i, j]] (from
    [B, H, 2*span, L], gathered along the buckets: no transpose), without transformers' per-batch copies of the
    position projections. Padding keys are masked by filling their p2c columns.

    Built per block of query rows into one [B, H, L, L] buffer kept for every layer of the forward (a fresh tensor
    of that size costs more in page faults than filling it). Past the distance where the log buckets saturate
    (|i - j| >= ~512 with DeBERTa-v3's settings) index[i, j] is constant, so there c2p + p2c is an outer sum
    c2p[i, far] + p2c[far, j], written by one broadcast add instead of two gathers. Bit-identical to gathering
    everything (the same values, added in the same order).
    """

    block = 64  # query rows per block on CPU

    def __init__(self, index: torch.Tensor, mask: torch.Tensor, block: int | None = None):
        self.index, self.block = index, block or self.block
        self.key_padding = None if bool(mask.all()) else ~mask[:, None, None, :]
        self.buffer: torch.Tensor | None = None
        # index[i, j] depends on i - j only and never decreases with it; its first row is i - j = -j.
        first_row, first_column = index[0], index[:, 0]
        self.far_right, self.far_left = int(first_row[-1]), int(first_column[-1])
        # the smallest distances from which every farther key has the far index (L: never within this length)
        self.right_reach = _first(first_row == self.far_right, len(first_row))
        self.left_reach = _first(first_column == self.far_left, len(first_column))

    def bias(self, query, key, pos_query, pos_key, scale: float) -> torch.Tensor:
        batch, heads, length, _ = query.shape
        p2c = torch.matmul(pos_query / scale, key.transpose(-1, -2))
        if self.key_padding is not None:
            p2c.masked_fill_(self.key_padding, torch.finfo(p2c.dtype).min)
        c2p = None if pos_key is None else torch.matmul(query, pos_key.transpose(-1, -2) / scale)
        if self.buffer is None or self.buffer.dtype != p2c.dtype:
            self.buffer = torch.empty((batch, heads, length, length), dtype=p2c.dtype, device=p2c.device)
        for start in range(0, length, self.block):
            stop = min(start + self.block, length)
            # keys left of `low` are far left of every query of the block, keys from `high` far right
            low, high = max(0, start - self.left_reach + 1), min(length, stop - 1 + self.right_reach)
            self._fill(self.buffer[:, :, start:stop], c2p, p2c, start, stop, low, high)
        return self.buffer

    def _fill(self, out, c2p, p2c, start: int, stop: int, low: int, high: int) -> None:
        rows = self.index[start:stop, low:high].expand(*out.shape[:2], stop - start, high - low)
        near = torch.gather(p2c[..., low:high], -2, rows)
        if c2p is None:
            out[..., low:high] = near
        else:
            torch.add(torch.gather(c2p[:, :, start:stop], -1, rows), near, out=out[..., low:high])
        for far, columns in ((self.far_left, slice(0, low)), (self.far_right, slice(high, out.shape[-1]))):
            if columns.start < columns.stop:
                p2c_far = p2c[:, :, far, None, columns]
                if c2p is None:
                    out[..., columns] = p2c_far
                else:
                    torch.add(c2p[:, :, start:stop, far, None], p2c_far, out=out[..., columns])


def _first(flags: torch.Tensor, default: int) -> int:
    """Index of the first True from which all are True (`default` when the last is False)."""
    if not bool(flags[-1]):
        return default
    false = (~flags).nonzero()
    return int(false[-1]) + 1 if len(false) else 0


def _disentangled_attention(
    attn: nn.Module,
    hidden: torch.Tensor,
    rel_embeddings: torch.Tensor,
    positions: _SkewedPositions | _BucketedPositions,
) -> torch.Tensor:
    """Disentangled self-attention: softmax(QK^T / s + c2p + p2c) V by `scaled_dot_product_attention`, with the
    position bias c2p[i, j] + p2c[i, j] (query content . key position, key content . query position, both at
    bucket(i - j)) built by `positions` from `rel_embeddings` (its rows: see `fast_encoder`)."""
    heads = attn.num_attention_heads

    def split(x: torch.Tensor) -> torch.Tensor:  # [..., L, H*d] -> [..., H, L, d]
        return x.unflatten(-1, (heads, -1)).transpose(-3, -2)

    if "p2c" not in attn.pos_att_type:
        raise ValueError("the fast encoder needs DeBERTa's p2c attention term")
    query, key, value = split(attn.query_proj(hidden)), split(attn.key_proj(hidden)), split(attn.value_proj(hidden))
    scale = attention_scale(query.shape[-1], 1 + len(attn.pos_att_type))
    pos_query = split(attn.query_proj(rel_embeddings) if attn.share_att_key else attn.pos_query_proj(rel_embeddings))
    pos_key = None
    if "c2p" in attn.pos_att_type:
        pos_key = split(attn.key_proj(rel_embeddings) if attn.share_att_key else attn.pos_key_proj(rel_embeddings))
    bias = positions.bias(query, key, pos_query, pos_key, scale)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=1.0 / scale)
    return context.transpose(1, 2).flatten(2)


def _flashdeberta_encoder(encoder: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, kernel: str) -> torch.Tensor:
    """The same layers with attention by `flashdeberta.ops.flash_attention.flash_attention_with_disentangled`
    (q, k, v [B, H, L, d], right-padding lengths, the [1, H, 2*span, d] position projections, our float32 scale)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention_kernel must be one of {', '.join(ATTENTION_KERNELS)}, got {kernel!r}")
    if hidden.device.type != "cuda":
        raise ValueError(f"attention_kernel 'flashdeberta' needs a CUDA device, got {hidden.device}")
    try:
        from flashdeberta.ops.flash_attention import flash_attention_with_disentangled
    except ImportError as error:
        raise ImportError(
            f"attention_kernel 'flashdeberta' needs the flashdeberta package (pip install flashdeberta): {error}"
        ) from error
    rel_embeddings = encoder.get_rel_embedding()
    lengths = mask.sum(-1).to(torch.int32)
    for layer in encoder.layer:
        attn = layer.attention.self

        # [..., L, H*d] -> [..., H, L, d]
        def split(x: torch.Tensor, heads: int = attn.num_attention_heads) -> torch.Tensor:
            return x.unflatten(-1, (heads, -1)).transpose(-3, -2).contiguous()

        query, key, value = split(attn.query_proj(hidden)), split(attn.key_proj(hidden)), split(attn.value_proj(hidden))
        scale = attention_scale(query.shape[-1], 1 + len(attn.pos_att_type))
        shared = attn.share_att_key
        pos_key = split(attn.key_proj(rel_embeddings) if shared else attn.pos_key_proj(rel_embeddings))[None]
        pos_query = split(attn.query_proj(rel_embeddings) if shared else attn.pos_query_proj(rel_embeddings))[None]
        context = flash_attention_with_disentangled(
            query,
            key,
            value,
            lengths,
            pos_key if "c2p" in attn.pos_att_type else None,
            pos_query,
            False,
            1.0 / scale,
            encoder.position_buckets,
            encoder.max_relative_positions,
        )
        attended = layer.attention.output(context.transpose(1, 2).flatten(2), hidden)
        hidden = layer.output(layer.intermediate(attended), attended)
    return hidden
