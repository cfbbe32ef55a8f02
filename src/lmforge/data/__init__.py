"""Data layer: sources → cleaning → tokenizer → token shards → packed blocks → resumable batches.

corpus.py readers.py hf_dataset.py mixture.py   where documents come from (files, HF datasets, weighted mixes)
clean.py dedup.py                               normalisation, quality filters, exact / MinHash dedup, report
tokenizer.py tokenizer_kinds.py                 BPE / byte / WordPiece / Unigram / pretrained, exact byte counts
shards.py packed.py                             token shards + manifest; fixed-length blocks, document masks
sampler.py datamodule.py                        deterministic rank-sharded order, exact resume; the DataModule
Knows nothing of models.
"""
