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


def save_tiny_whisper(path: str, *, seed: int = 0) -> str:
  """A two-layer random Whisper with a byte-level vocabulary and Whisper's special tokens
  (<|en|>, <|zh|>, <|transcribe|>, ...), so the pipeline's language and task settings and
  batched decoding run as with a real checkpoint."""
  import torch
  from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                            WhisperForConditionalGeneration, WhisperProcessor,
                            WhisperTokenizer)
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  os.makedirs(path, exist_ok=True)
  vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
  specials = ['<|endoftext|>', '<|startoftranscript|>', '<|en|>', '<|zh|>', '<|translate|>',
              '<|transcribe|>', '<|startoflm|>', '<|startofprev|>', '<|nocaptions|>',
              '<|notimestamps|>']
  ids = {s: len(vocab) + k for k, s in enumerate(specials)}
  vocab.update(ids)
  with open(os.path.join(path, 'vocab.json'), 'w') as f:
    json.dump(vocab, f)
  with open(os.path.join(path, 'merges.txt'), 'w') as f:
    f.write('#version: 0.2\n')
  end = ids['<|endoftext|>']
  tokenizer = WhisperTokenizer(os.path.join(path, 'vocab.json'), os.path.join(path, 'merges.txt'),
                               unk_token='<|endoftext|>', bos_token='<|endoftext|>',
                               eos_token='<|endoftext|>', pad_token='<|endoftext|>')
  tokenizer.add_special_tokens({'additional_special_tokens': specials[1:]})
  config = WhisperConfig(
      vocab_size=len(vocab), num_mel_bins=80, encoder_layers=1, decoder_layers=1,
      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
      decoder_ffn_dim=32, d_model=16, max_source_positions=1500, max_target_positions=64,
      pad_token_id=end, bos_token_id=end, eos_token_id=end,
      decoder_start_token_id=ids['<|startoftranscript|>'])
  torch.manual_seed(seed)
  model = WhisperForConditionalGeneration(config).eval()
  model.generation_config = GenerationConfig(
      decoder_start_token_id=ids['<|startoftranscript|>'], eos_token_id=end, pad_token_id=end,
      bos_token_id=end, max_length=24, is_multilingual=True,
      lang_to_id={'<|en|>': ids['<|en|>'], '<|zh|>': ids['<|zh|>']},
      task_to_id={'transcribe': ids['<|transcribe|>'], 'translate': ids['<|translate|>']},
      no_timestamps_token_id=ids['<|notimestamps|>'])
  model.save_pretrained(path)
  WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80),
                   tokenizer=tokenizer).save_pretrained(path)
  return path
