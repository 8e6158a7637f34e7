"""What several test modules share: tiny configs and models, and the oracles that the ops are checked against.

Fixtures stay in conftest.py; a test module imports plain helpers from here, never from another test module.
"""

import functools
import json
from typing import NamedTuple

import numpy as np
import torch

from spidr_fast.models import DinoSR, DinoSRConfig, SpidR, SpidRConfig
from spidr_fast.train import config as config_module

# --- tiny models and training runs ---------------------------------------------------------------------------------

# A model small enough for CPU tests that still has every part of the real one.
TINY = dict(
    extractor_conv_layer_config=[(32, 10, 5), (32, 3, 2), (32, 2, 2)],
    encoder_embed_dim=64,
    encoder_num_heads=4,
    encoder_num_layers=4,
    encoder_ff_interm_features=128,
    encoder_pos_conv_kernel=16,
    encoder_pos_conv_groups=4,
    encoder_pos_conv_depth=2,
    codebook_size=17,
    num_codebooks=3,
)
MODELS = {"spidr": (SpidR, SpidRConfig), "dinosr": (DinoSR, DinoSRConfig)}
NUM_SAMPLES = 4000  # 199 frames with TINY's extractor


def tiny(name, **overrides):
    model_class, config_class = MODELS[name]
    return model_class(config_class(**TINY | overrides))


def batch(model, num_utterances=3, num_masked=40, padded=True):
    waveforms = torch.randn(num_utterances, NUM_SAMPLES)
    frames = model.feature_extractor(waveforms[:1]).shape[1]
    mask_indices = torch.stack([torch.randperm(frames)[:num_masked] for _ in range(num_utterances)])
    lengths = torch.tensor([frames - 7 * i for i in range(num_utterances)])
    attention_mask = (torch.arange(frames) < lengths.unsqueeze(1))[:, None, None, :] if padded else None
    return waveforms, mask_indices, attention_mask


# 20 ms frames like the real model, everything else tiny.
TINY_TRAIN = {
    "run": {
        "model_type": "spidr",
        "log_interval": 1,
        "save_interval": 2,
        "keep_latest": 2,
        "compile": False,
        "validate_interval": 0,
    },
    "data": {
        "synthetic_utterances": 12,
        "num_workers": 0,
        "max_sample_size": 24_000,
        "max_batch_length": 60_000,
        "min_sample_size": 8_000,
        "num_buckets": 2,
    },
    "model": TINY | {"extractor_conv_layer_config": [[32, 10, 5], [32, 4, 4], [32, 4, 4], [32, 4, 4]]},
    "optimizer": {"max_steps": 4, "warmup_steps": 1, "scheduler": "cosine", "dtype": "float32", "lr": 1e-3},
    "validation": {
        "synthetic": {
            "synthetic_utterances": 3,
            "synthetic_seed": 1,
            "num_workers": 0,
            "max_sample_size": 24_000,
            "max_batch_length": 60_000,
            "min_sample_size": 8_000,
            "num_buckets": 1,
        }
    },
}


def tiny_config(**sections):
    return config_module.config_from_dict(config_module.merge(TINY_TRAIN, sections))


def tiny_cli_args(run_dir, *extra):
    args = ["--run-dir", str(run_dir), "--no-progress"]
    for section, fields in TINY_TRAIN.items():
        for name, value in fields.items():
            for field, leaf in value.items() if section == "validation" else [(None, value)]:
                key = f"{section}.{name}" if field is None else f"{section}.{name}.{field}"
                args.append(f"--set={key}={json.dumps(leaf)}")
    return args + list(extra)


# --- codebook ------------------------------------------------------------------------------------------------------


def random_codebooks(num_layers: int, num_codewords: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.rand(num_layers, num_codewords) * 5 + 0.5
    codebook = torch.randn(num_layers, num_codewords, dim) * counts.unsqueeze(-1)
    return codebook, counts


# --- heads_cross_entropy -------------------------------------------------------------------------------------------

TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def direct(x, weight, bias, labels):
    logits = torch.einsum("lnd,lkd->lnk", x, weight)
    if bias is not None:
        logits = logits + bias.unsqueeze(1)
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return nll.mean(0), torch.softmax(logits, -1).mean(1)


# --- attention: packing a padded batch, and the dropout mask of csrc/flash/philox.h in NumPy ----------------------


class Packed(NamedTuple):
    tokens: torch.Tensor  # (total_tokens, ...)
    cu_seqlens: torch.Tensor  # (B + 1,) int32
    max_seqlen: int
    token_index: torch.Tensor  # (total_tokens,) int64 position of each token among the B * T padded frames


def cu_seqlens_from_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True on real frames → (B + 1,) int32 cumulative lengths starting at 0."""
    lengths = key_padding_mask.sum(1, dtype=torch.int32)
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def pack(padded: torch.Tensor, key_padding_mask: torch.Tensor) -> Packed:
    """Keep the real frames of `padded` (B, T, ...). Real frames need not be a prefix of each row."""
    token_index = key_padding_mask.flatten().nonzero().squeeze(1)
    max_seqlen = int(key_padding_mask.sum(1).max()) if key_padding_mask.numel() else 0
    tokens = padded.flatten(0, 1).index_select(0, token_index)
    return Packed(tokens, cu_seqlens_from_mask(key_padding_mask), max_seqlen, token_index)


_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))
_LOW32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: np.ndarray, key0: int, key1: int) -> np.ndarray:
    """counter (..., 4) uint32 → (..., 4) uint32 draws, Philox4x32 with 10 rounds."""
    x, y, z, w = (counter[..., i].astype(np.uint64) for i in range(4))
    k0, k1 = np.uint32(key0), np.uint32(key1)
    with np.errstate(over="ignore"):
        for round_index in range(10):
            if round_index:
                k0, k1 = k0 + _PHILOX_W[0], k1 + _PHILOX_W[1]
            product0, product1 = _PHILOX_M[0] * x, _PHILOX_M[1] * z
            x, y, z, w = (
                (product1 >> np.uint64(32)) ^ y ^ np.uint64(k0),
                product1 & _LOW32,
                (product0 >> np.uint64(32)) ^ w ^ np.uint64(k1),
                product0 & _LOW32,
            )
    return np.stack([x, y, z, w], axis=-1).astype(np.uint32)


def dropout_keep_mask(
    rng_state: torch.Tensor, heads: int, query_start: int, length: int, dropout_p: float
) -> torch.Tensor:
    """(heads, length, length) bool: which attention weights of the sequence starting at token `query_start`
    the kernels keep, for the same rng_state (csrc/flash/philox.h: one call's four draws per block of weights
    {q, q + 8} x {k, k + 8})."""
    seed, offset = (int(x) & 0xFFFFFFFFFFFFFFFF for x in rng_state.cpu().tolist())
    return _dropout_keep_mask(seed, offset, heads, query_start, length, dropout_p).clone()


@functools.lru_cache(maxsize=8)  # a test's float32 and low-precision references ask for the same mask
def _dropout_keep_mask(
    seed: int, offset: int, heads: int, query_start: int, length: int, dropout_p: float
) -> torch.Tensor:
    tiles = (length + 15) // 16  # a block's q is 16a + b (b < 8), its k 16c + d: counter (start + q, 8c + d)
    block_queries = (16 * np.arange(tiles)[:, None] + np.arange(8)).ravel()
    head, query, key_block = np.meshgrid(np.arange(heads), block_queries, np.arange(8 * tiles), indexing="ij")
    counter = np.stack(
        [query_start + query, key_block, head, np.full_like(key_block, offset & 0xFFFFFFFF)], axis=-1
    ).astype(np.uint32)
    # draw 2 * query_high + key_high of the four goes to weight (q + 8 query_high, k + 8 key_high)
    draws = philox4x32_10(counter, seed & 0xFFFFFFFF, seed >> 32).reshape(heads, tiles, 8, tiles, 8, 2, 2)
    draws = draws.transpose(0, 1, 5, 2, 3, 6, 4).reshape(heads, 16 * tiles, 16 * tiles)[:, :length, :length]
    threshold = int(np.ldexp(dropout_p, 32))
    return torch.from_numpy(draws >= np.uint32(min(threshold, 2**32 - 1)))
