"""Model FLOPs of the thinker for a given batch, and MFU.

`step_flops(config, batch)` counts the matmul FLOPs one training step needs for a batch as
the train step sees it (the thinker's `model_inputs` arrays plus `labels`), from the
batch's own token, patch and chunk counts. Padding is not counted: a padded token, mel
frame, patch, window slot or chunk is work the hardware does but the model does not need.

Conventions (as in the PaLM paper's MFU, appendix B, and MaxText):
* A multiply-add is 2 FLOPs; only matmuls (dense layers, convolutions, attention scores and
  values) count. Norms, activations, softmax and RoPE are well under 1% and are left out.
* Attention counts the (query, key) pairs the model actually attends: causal in the
  decoder (a row of l valid tokens has l(l+1)/2 pairs), all pairs within each audio chunk,
  vision window or vision frame in the towers. Scores QK^T and values PV cost 2 * heads *
  head_dim each per pair.
* The LM head counts only the positions that have a trained target (`labels[t+1] != -100`):
  the loss needs logits there and nowhere else.
* Training = forward + backward, and the backward of a matmul costs twice its forward
  (gradients of its input and of its weight): 3x forward for everything that trains. The
  first layer of each tower (conv1, patch embedding) sees data, not activations, so its
  input gradient is never needed: 2x. A frozen part ('llm': the towers) costs 1x forward;
  with LoRA ('lora') the decoder and head need activation gradients only: 2x (the adapters'
  own FLOPs are negligible).

Model FLOPs vs hardware FLOPs. MFU uses model FLOPs; what the compiled step executes is
more, and `step_flops(..., hardware=True)` adds the known extras:
* rematerialisation repeats forward work in the backward pass: remat='full' repeats the
  whole forward of every trained layer stack except each layer's last matmul (the MLP down
  projection, whose output the backward does not need); remat='dots' saves the dense-layer
  outputs but not the batched attention einsums (+1x attention);
* the loss projects whole chunks: every position of a chunk that holds a target is
  computed (targets are moved to the front of each row first, see `losses`). The SFT loss
  forms the head's gradients in its forward pass: 3 head passes, the head's weight
  gradient included even when the head is frozen. The DPO loss (a batch with
  `ref_chosen_logps`) recomputes each chunk's logits in the backward pass: 4 passes (3
  with a frozen head), except when the sequence fits in one chunk, where XLA reuses the
  forward's logits;
* the vision tower recomputes its block attention in the backward pass (+1x).
Padding, and the masked half of the decoder's attention score matrix that XLA computes
anyway, are still not counted there.

`mfu(flops_per_s, peak)` is model FLOPs per second over the device's peak;
`peak_flops(device)` knows the dense bf16 peak of common accelerators (None on CPU, where
the benchmarks measure a matmul peak instead).
"""

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from saber_jax.batch import IGNORE_INDEX
from saber_jax.models.config import AudioConfig, TextConfig, ThinkerConfig, VisionConfig
from saber_jax.train.steps import TRAINABLE_MODES


# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity), matched by substring of
# `device.device_kind`, most specific first.
PEAK_BF16_FLOPS = (
    ('H200', 989e12),
    ('H100', 989e12),          # SXM; the PCIe card is 756e12
    ('A100', 312e12),
    ('TPU v6', 918e12),        # v6e (Trillium)
    ('TPU v5p', 459e12),
    ('TPU v5', 197e12),        # v5e / v5 lite
    ('TPU v4', 275e12),
)


@dataclasses.dataclass(frozen=True)
class BatchCounts:
  """What the FLOPs of a batch depend on (valid work only, no padding).

  text_lengths       [B] valid tokens per row.
  head_positions     positions whose logits the loss needs (a trained next token).
  audio_chunk_frames [C] valid mel frames of each audio chunk.
  audio_tokens       pooled audio tokens (= <|AUDIO|> placeholders).
  vision_patches     valid patches (before merging).
  window_patches     [W] patches of each vision attention window.
  frame_patches      [F] patches of each frame (the full-attention blocks).
  head_chunk_positions  positions the chunked loss actually projects (whole chunks that
                     hold a target), for hardware FLOPs; defaults to head_positions.
  recompute_head     the loss recomputes its logits in the backward pass (DPO over more
                     than one chunk), for hardware FLOPs.
  masked_pairs       causal (query, key) pairs a segment mask removes: in a CA-DPO row
                     `[prompt | chosen | rejected]` the rejected answer never sees the
                     chosen one.
  """
  text_lengths: np.ndarray
  head_positions: int
  audio_chunk_frames: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, int))
  audio_tokens: int = 0
  vision_patches: int = 0
  window_patches: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, int))
  frame_patches: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, int))
  head_chunk_positions: int | None = None
  recompute_head: bool = False
  masked_pairs: int = 0


# ----------------------------------------------------------------------------- forward


def decoder_forward_flops(text: TextConfig, text_lengths, head_positions: int,
                          masked_pairs: int = 0) -> dict:
  """Forward FLOPs of the Qwen2 decoder: {'dense', 'attention', 'head'}.

  dense: q/k/v/o projections (GQA: k and v have num_key_value_heads heads) and the SwiGLU
  MLP per valid token per layer; attention: 4 * heads * head_dim per causal (query, key)
  pair per layer (less the `masked_pairs` a segment mask removes); head: 2 * hidden *
  vocab per scored position.
  """
  h, hd = text.hidden_size, text.head_dim
  q_width, kv_width = text.num_attention_heads * hd, text.num_key_value_heads * hd
  per_token = 2 * (h * q_width + 2 * h * kv_width + q_width * h + 3 * h * text.intermediate_size)
  lengths = np.asarray(text_lengths, np.int64)
  causal_pairs = int(np.sum(lengths * (lengths + 1) // 2)) - masked_pairs
  return dict(dense=float(per_token * text.num_hidden_layers * lengths.sum()),
              attention=float(4 * q_width * causal_pairs * text.num_hidden_layers),
              head=float(2 * h * text.vocab_size * head_positions))


def audio_forward_flops(audio: AudioConfig, chunk_frames, num_tokens: int) -> dict:
  """Forward FLOPs of the audio tower: {'conv1', 'conv2', 'layers', 'attention', 'proj'}.

  Per chunk of f valid frames: conv1 (k3, mel -> d) on f frames, conv2 (k3 stride 2) on
  t = (f + 1) // 2 frames, then per layer q/k/v/out and fc1/fc2 on t tokens and attention
  over the t x t pairs of the chunk; the projection runs on the pooled tokens.
  """
  d, f = audio.d_model, audio.encoder_ffn_dim
  frames = np.asarray(chunk_frames, np.int64)
  frames = frames[frames > 0]
  tokens = (frames + 1) // 2
  layers = audio.encoder_layers
  return dict(conv1=float(2 * 3 * audio.num_mel_bins * d * frames.sum()),
              conv2=float(2 * 3 * d * d * tokens.sum()),
              layers=float(2 * (4 * d * d + 2 * d * f) * tokens.sum() * layers),
              attention=float(4 * d * np.sum(tokens * tokens) * layers),
              proj=float(2 * d * audio.output_dim * num_tokens))


def vision_forward_flops(vision: VisionConfig, num_patches: int, window_patches,
                         frame_patches) -> dict:
  """Forward FLOPs of the vision tower: {'patch_embed', 'layers', 'attention', 'merger'}.

  Layers in `fullatt_block_indexes` attend within each frame, the others within each
  window; the merger's two dense layers run on the num_patches / merge^2 merged tokens.
  """
  c, m2 = vision.hidden_size, vision.spatial_merge_size ** 2
  patch_dim = vision.patch_dim
  full_layers = sum(1 for i in set(vision.fullatt_block_indexes) if 0 <= i < vision.depth)
  window_layers = vision.depth - full_layers
  pairs = lambda sizes: int(np.sum(np.asarray(sizes, np.int64) ** 2))
  merged_width = c * m2
  return dict(
      patch_embed=float(2 * patch_dim * c * num_patches),
      layers=float(2 * (4 * c * c + 3 * c * vision.intermediate_size) * num_patches
                   * vision.depth),
      attention=float(4 * c * (window_layers * pairs(window_patches)
                               + full_layers * pairs(frame_patches))),
      merger=float(2 * (merged_width * merged_width + merged_width * vision.out_hidden_size)
                   * (num_patches // m2)))


def forward_flops(config: ThinkerConfig, counts: BatchCounts) -> dict[str, dict]:
  """Forward FLOPs of every part: {'text': {...}, 'audio': {...}, 'vision': {...}}."""
  return dict(
      text=decoder_forward_flops(config.text, counts.text_lengths, counts.head_positions,
                                 counts.masked_pairs),
      audio=audio_forward_flops(config.audio, counts.audio_chunk_frames, counts.audio_tokens),
      vision=vision_forward_flops(config.vision, counts.vision_patches, counts.window_patches,
                                  counts.frame_patches))


def total(parts: Mapping[str, Mapping[str, float]]) -> float:
  return float(sum(v for part in parts.values() for v in part.values()))


# ----------------------------------------------------------------------------- training


def _multipliers(trainable: str) -> dict[str, dict[str, float]]:
  """Training FLOPs as multiples of each forward term (see the module docstring)."""
  if trainable not in TRAINABLE_MODES:
    raise ValueError(f'trainable must be one of {TRAINABLE_MODES}, got {trainable!r}')
  towers = trainable == 'full'
  text = 3.0 if trainable in ('full', 'llm') else 2.0
  tower = lambda first: {first: 2.0 if towers else 1.0, '*': 3.0 if towers else 1.0}
  return dict(text={'*': text}, audio=tower('conv1'), vision=tower('patch_embed'))


def training_flops(config: ThinkerConfig, counts: BatchCounts, trainable: str = 'full',
                   hardware: bool = False) -> dict[str, dict]:
  """Training FLOPs of every term (forward x multiplier, plus recompute if `hardware`)."""
  fwd = forward_flops(config, counts)
  multipliers = _multipliers(trainable)
  out = {part: {term: value * multipliers[part].get(term, multipliers[part]['*'])
                for term, value in terms.items()} for part, terms in fwd.items()}
  if hardware:
    trains = {'text': True, 'audio': trainable == 'full', 'vision': trainable == 'full'}
    for part, terms in fwd.items():
      if not trains[part]:
        continue
      if config.remat == 'full':
        # The layer stack's forward runs again in the backward pass, except each layer's
        # last dense layer, whose output the backward does not need.
        stack = 'dense' if part == 'text' else 'layers'
        out[part][stack] += terms[stack] - _last_dense_flops(config, part, counts)
        out[part]['attention'] += terms['attention']
      elif config.remat == 'dots':         # batched (attention) dots are not saved
        out[part]['attention'] += terms['attention']
    if trainable == 'full' and config.remat != 'full':
      out['vision']['attention'] += fwd['vision']['attention']   # checkpointed block attention
    computed = counts.head_chunk_positions
    computed = counts.head_positions if computed is None else computed
    head_per_position = 2 * config.text.hidden_size * config.text.vocab_size
    if counts.recompute_head:       # forward, recompute, input gradient (+ weight gradient)
      passes = multipliers['text']['*'] + 1
    else:                           # logits, input gradient and weight gradient, one pass
      passes = 3
    out['text']['head'] = head_per_position * computed * passes
  return out


def _last_dense_flops(config: ThinkerConfig, part: str, counts: BatchCounts) -> float:
  """Forward FLOPs of the MLP down projection (the last matmul of a layer) of a stack."""
  if part == 'text':
    t = config.text
    return 2.0 * t.intermediate_size * t.hidden_size * t.num_hidden_layers * np.sum(
        counts.text_lengths)
  if part == 'audio':
    a = config.audio
    tokens = (np.asarray(counts.audio_chunk_frames, np.int64) + 1) // 2
    return 2.0 * a.encoder_ffn_dim * a.d_model * a.encoder_layers * np.sum(tokens)
  v = config.vision
  return 2.0 * v.intermediate_size * v.hidden_size * v.depth * counts.vision_patches


def step_flops(model_config: ThinkerConfig, batch: Mapping[str, Any], *, trainable: str = 'full',
               hardware: bool = False, chunk_size: int | None = None) -> float:
  """Model FLOPs of one training step on `batch` (the dict the train step sees).

  `trainable` is the run's 'full' | 'llm' | 'lora'. With `hardware=True`, the estimate of
  what the compiled step executes (remat and loss-chunk recompute, see the module
  docstring; `chunk_size` is the loss's `logps_chunk_size`).
  """
  counts = batch_counts(model_config, batch, chunk_size=chunk_size)
  return total(training_flops(model_config, counts, trainable, hardware))


def mfu(flops_per_s: float, peak_flops_per_s: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the peak FLOP/s (same devices)."""
  if peak_flops_per_s <= 0:
    raise ValueError(f'peak FLOP/s must be positive, got {peak_flops_per_s}')
  return flops_per_s / peak_flops_per_s


def peak_flops(device: jax.Device | None = None) -> float | None:
  """Dense bf16 peak FLOP/s of one accelerator, or None when unknown (e.g. a CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PEAK_BF16_FLOPS:
    if name.lower() in kind.lower():
      return peak
  return None


# ----------------------------------------------------------------------------- counts


def _per_shard_blocks(blocks_mask, slots, patch_mask) -> np.ndarray:
  """Patches of each real attention block of one data shard. Padding blocks (one
  unmasked slot on token 0, see `vision._blocks`) hold no valid patch's slot."""
  block_len = blocks_mask.shape[-1]
  real = np.unique(slots[patch_mask] // block_len)
  return blocks_mask.sum(-1)[real]


def _head_chunk_positions(labels: np.ndarray, chunk_size: int | None, padded: bool) -> int:
  """Positions the chunked loss projects. Scored positions go to the front of each row
  (`lm_head._targets_first`), the rows are cut into chunks of `chunk_size` and every chunk
  that holds a target in any row is projected for all rows. `padded`: the last chunk is
  padded to the full size (the SFT loss); otherwise it is the shorter tail (DPO)."""
  targets = np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), IGNORE_INDEX)], 1)
  longest = int(np.max(np.sum(targets != IGNORE_INDEX, axis=1), initial=0))
  rows, length = targets.shape
  size = length if chunk_size is None else min(chunk_size, length)
  chunks = -(-longest // size)
  width = chunks * size if padded else min(chunks * size, length)
  return rows * width


def _cross_segment_pairs(segments: np.ndarray) -> int:
  """(query, key) pairs between different exclusive segments (ids >= 2) of each row:
  what `text.segment_mask` removes from the causal triangle of a row whose segments
  follow each other."""
  ids = np.arange(2, max(int(segments.max(initial=0)), 1) + 1)
  sizes = (segments[:, :, None] == ids).sum(1).astype(np.int64)       # [B, segments]
  return int(np.sum(sizes.sum(1) ** 2 - (sizes ** 2).sum(1)) // 2)


def batch_counts(config: ThinkerConfig, batch: Mapping[str, Any],
                 chunk_size: int | None = None) -> BatchCounts:
  """The counts of a train-step batch: `input_ids`, `attention_mask`, optional `labels`
  (without them every valid position counts for the head, as for a full forward), the
  `audio` / `vision` dicts of `thinker.model_inputs` (leading data-shard axis) and, for
  CA-DPO, `ref_chosen_logps` and `pair_segments`. `chunk_size` (the loss's) matters for
  hardware FLOPs only."""
  input_ids = np.asarray(batch['input_ids'])
  mask = batch.get('attention_mask')
  mask = np.ones(input_ids.shape, bool) if mask is None else np.asarray(mask).astype(bool)
  labels = batch.get('labels')
  dpo = 'ref_chosen_logps' in batch
  if labels is None:
    head_positions = int(mask.sum())
    head_chunk_positions = int(input_ids.size)
  else:
    labels = np.asarray(labels)
    if labels.shape != input_ids.shape:
      raise ValueError(f'labels {labels.shape} and input_ids {input_ids.shape} disagree')
    head_positions = int(np.sum(labels[:, 1:] != IGNORE_INDEX))
    head_chunk_positions = _head_chunk_positions(labels, chunk_size, padded=not dpo)
  one_chunk = chunk_size is None or chunk_size >= input_ids.shape[1]
  counts = dict(text_lengths=mask.sum(-1), head_positions=head_positions,
                head_chunk_positions=head_chunk_positions, recompute_head=dpo and not one_chunk)
  if 'pair_segments' in batch:
    counts['masked_pairs'] = _cross_segment_pairs(np.asarray(batch['pair_segments']))
  if 'audio' in batch:
    audio = batch['audio']
    counts.update(audio_chunk_frames=np.asarray(audio['chunk_lengths']).reshape(-1),
                  audio_tokens=int(np.sum(input_ids == config.audio_token_id)))
  if 'vision' in batch:
    vision = {k: np.asarray(v) for k, v in batch['vision'].items()}
    patch_mask = vision['patch_mask']                                       # [S, P]
    blocks = lambda kind: np.concatenate([np.zeros(0, np.int64)] + [
        _per_shard_blocks(vision[f'{kind}_block_mask'][s], vision[f'{kind}_slots'][s],
                          patch_mask[s]) for s in range(len(patch_mask))])
    counts.update(vision_patches=int(patch_mask.sum()), window_patches=blocks('window'),
                  frame_patches=blocks('frame'))
  return BatchCounts(**counts)
