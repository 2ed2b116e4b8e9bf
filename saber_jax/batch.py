"""The batch vocabulary: every key of a training batch, its ids and its split axis.

The bottom module of the package (it imports nothing from it): the data pipeline writes
these keys and ids, the model, the losses, the steps and the sharding read them, so each
layer agrees with the others through this file instead of through each other.

A process's batch (`data.collate.collate`) holds B rows of L tokens, cut into
`num_data_shards` contiguous data shards of B / num_data_shards rows; each data shard's
media are encoded on the devices holding its rows, so media arrays lead with the shard.

  key                 shape, dtype          meaning                                  split
  input_ids           [B, L] int64          tokens, right padded with PAD_ID          0
  attention_mask      [B, L] int64          1: a real token                           0
  position_ids        [3, B, L] int64       TMRoPE ids (temporal, height, width)      1
  attention_segments  [B, L] int32          segments that attend apart (text.         0
                                            segment_mask); the DPO step sets them
                                            from pair_segments, collate does not
  audio               {k: [S, ...]}         audio tower inputs of each data shard     0
  vision              {k: [S, ...]}         vision tower inputs of each data shard    0
  labels              [B, L] int32          token trained at each position, else      0
                                            IGNORE_INDEX (transformers' convention)
  segments            [B, L] int32          SED section of a token (PROMPT, VISUAL,   0
                                            ACOUSTIC, REASONING)
  example_mask        [B] bool              False: a row with no example (dropped as  0
                                            too long, or reference-pass padding)
  truncated           [B] bool              the example's response was cut            0
  pair_segments       [B, L] int32          preference data: PAIR_PROMPT, CHOSEN,     0
                                            REJECTED, PAIR_PADDING
  ref_chosen_logps,   [P] float32           preference data: the reference model's    0
  ref_rejected_logps                        summed answer log-probs (0: no example)
  pair_index          [P] int64             reference pass: the pair's position in    none
  (PAIR_INDEX)                              the record files (-1: padding); host only
  fill (FILL)         [4] int64             FILL_FIELDS of the global batch; not a    none
                                            model input (the trainer pops it)

S = num_data_shards, P = pairs (B with one row per pair, `[prompt | chosen | rejected]`,
or B / 2 with rows `[prompt | chosen]`, `[prompt | rejected]`). Only MODEL_KEYS enter the
model; the rest feed the losses and the logs.
"""

IGNORE_INDEX = -100   # a label that trains nothing (transformers' ForCausalLMLoss)

# Padding token of training and reference rows: masked out everywhere, so any id works;
# 0 is below every vocabulary size (the tiny test models' too). Generation pads with the
# tokenizer's <|endoftext|> instead (decode.PAD_TOKEN_ID): it also fills the tokens after
# a sampled row's end, as transformers' generate does, and must be a real id of the model.
PAD_ID = 0

# `segments`: the SED section each token belongs to (data.sed writes them, Eq. 2 reads).
PROMPT, VISUAL, ACOUSTIC, REASONING = 0, 1, 2, 3
SECTION_IDS = {'visual': VISUAL, 'acoustic': ACOUSTIC, 'reasoning': REASONING}
SEGMENT_NAMES = {segment_id: name for name, segment_id in SECTION_IDS.items()}

# `pair_segments`: which part of a preference pair a token belongs to. The prompt's id is
# also text.SHARED_PREFIX: the segment every answer of a shared-prompt row attends to.
PAIR_PADDING, PAIR_PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3

# Keys the host reads and the step does not: popped before a batch goes to the devices.
FILL = 'fill'
PAIR_INDEX = 'pair_index'
FILL_FIELDS = ('text_real', 'text_padded', 'media_real', 'media_padded')

# The keys the thinker reads (`Thinker.__call__`); the rest of a batch is for the losses.
MODEL_KEYS = ('input_ids', 'attention_mask', 'position_ids', 'attention_segments', 'audio',
              'vision')
# Keys whose rows are not on the leading axis: position_ids [3, B, L].
ROW_AXIS = {'position_ids': 1}
# Keys with one entry per data shard (not per row): they scale with the shard count.
PER_SHARD_KEYS = ('audio', 'vision')
PER_PAIR_KEYS = ('ref_chosen_logps', 'ref_rejected_logps', 'pair_index')


def split_axis(key: str) -> int:
  """The axis of batch key `key` that is split over the data shards (rows or shards)."""
  return ROW_AXIS.get(key, 0)
