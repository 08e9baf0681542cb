"""PairRM: a DeBERTa-v2/v3 encoder that reads (source, candidate A, candidate B) as one sequence,
plus a small head over the hidden states of the three prefix tokens.

f(x, A, B) = g([h_src; h_A]) - g([h_src; h_B]) with g(u) = W2 tanh(W1 u + b1) + b2.
Parameter names match both published checkpoint layouts (`pretrained_model.*`, `head_layer.*`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DebertaV2Config, DebertaV2Model


class PairRMModel(nn.Module):
    """Encoder + pair head. `forward` returns one single-order logit f(x, A, B) per row."""

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
        """Last-layer hidden states only: the encoder is called without keeping every layer's output."""
        encoder = self.pretrained_model
        embeddings = encoder.embeddings(input_ids=input_ids, mask=attention_mask)
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
        hidden = self.encode(input_ids, attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        src, cand1, cand2 = hidden[rows, prefix_positions].unbind(1)
        left = self.head_layer(torch.cat([src, cand1], dim=-1))
        right = self.head_layer(torch.cat([src, cand2], dim=-1))
        return (left - right)[:, 0].float()
