"""LLM judges for the data and evaluation tools, in three parts imported separately (a
tool that never asks a judge imports no client):

  replies  the reply models (pydantic): the schema sent and the check applied
  client   `Judge.ask` against any OpenAI-compatible server
  runs     resumable, fingerprinted runs of many items (results and errors as JSONL)
"""
