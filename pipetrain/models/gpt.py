"""A small GPT-style causal decoder whose units are embedding, transformer blocks, final norm and head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "Block", "CausalSelfAttention", "Embedding", "gpt"]


class Embedding(nn.Module):
    """Token embedding plus learned absolute position embedding: ``(B, T)`` ids -> ``(B, T, d_model)``."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Embed a ``(B, T)`` LongTensor of token ids with ``T <= seq_len``."""
        t = idx.shape[-1]
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len {self.seq_len}")
        pos = torch.arange(t, device=idx.device)
        return self.tok(idx) + self.pos(pos)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused ``qkv`` projection."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` of shape ``(B, T, d_model)``; position ``t`` only sees positions ``<= t``."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        head_dim = d // self.num_heads
        q, k, v = (z.view(b, t, self.num_heads, head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, T, d_model)`` to ``(B, T, d_model)``."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only language model with children ``embed``, ``blocks``, ``ln_f`` and ``head``.

    Its units are ``embed, blocks.0 .. blocks.{num_layers - 1}, ln_f, head``. With
    ``tie_embeddings=True`` the head weight is the same Parameter as ``embed.tok.weight``.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        d_model: int,
        num_heads: int,
        num_layers: int,
        tie_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.embed = Embedding(vocab_size, seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        if tie_embeddings:
            self.head.weight = self.embed.tok.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Map ``(B, T)`` token ids to ``(B, T, vocab_size)`` next-token logits."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt(
    vocab_size: int = 256,
    seq_len: int = 32,
    d_model: int = 64,
    num_heads: int = 4,
    num_layers: int = 4,
    tie_embeddings: bool = False,
) -> nn.Module:
    """Build a :class:`GPT`. With the defaults its units are ``embed, blocks.0..3, ln_f, head``."""
    return GPT(vocab_size, seq_len, d_model, num_heads, num_layers, tie_embeddings)
