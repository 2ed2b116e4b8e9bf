"""A tiny random ASR model built offline: a character-level CTC model (Wav2Vec2ForCTC, two
layers of width 32) with a hand-made vocabulary, saved with save_pretrained so that
transformers' `automatic-speech-recognition` pipeline loads it like any checkpoint."""

import json
import os

CHARS = "abcdefghijklmnopqrstuvwxyz'"


def save_tiny_ctc(path: str, *, seed: int = 0, silent: bool = False) -> str:
  """Writes the model, tokenizer and feature extractor to `path`; returns it. `silent`:
  the head always predicts the CTC blank, so every clip transcribes to '' (a model that
  hears no words, as in hummed audio)."""
  import torch
  from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor,
                            Wav2Vec2ForCTC, Wav2Vec2Processor)
  os.makedirs(path, exist_ok=True)
  vocab = {'<pad>': 0, '<unk>': 1, '|': 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
  with open(os.path.join(path, 'vocab.json'), 'w') as f:
    json.dump(vocab, f)
  tokenizer = Wav2Vec2CTCTokenizer(os.path.join(path, 'vocab.json'), unk_token='<unk>',
                                   pad_token='<pad>', word_delimiter_token='|')
  features = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                      do_normalize=True, return_attention_mask=True)
  config = Wav2Vec2Config(
      vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=37, conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, pad_token_id=0,
      do_stable_layer_norm=True, feat_extract_norm='layer')
  torch.manual_seed(seed)
  model = Wav2Vec2ForCTC(config).eval()
  if silent:
    with torch.no_grad():
      model.lm_head.weight.zero_()
      model.lm_head.bias.zero_()
      model.lm_head.bias[0] = 10.0
  model.save_pretrained(path)
  Wav2Vec2Processor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(path)
  return path
